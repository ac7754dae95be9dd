"""Error-table cases: writes (run by tests/test_errors.py; see tests/error_harness.py).

A command deletes or replaces only what it can prove it wrote, and never an input of the same command: each case
is a refusal that names the path and, where one exists, the flag that allows the write. tests/test_nothing_lost.py
holds the same situations end to end (a real zoo and a finished search), with the positive paths.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from error_harness import Case, Workspace, cli
from evox_merge.util.errors import MergeInputError, ZooError
from evox_merge.util.hashing import directory_sha256
from evox_merge.zoo.manifest import write_manifest
from evox_merge.zoo.presets import get_preset


def _zoo_dir(ws: Workspace) -> Path:
    """A zoo-shaped folder that a micro build of seed 0 wrote (a task file and its manifest; the build's other files
    are not needed to decide whether it may be replaced)."""
    root = ws.root / "zoo"
    (root / "tasks" / "reverse").mkdir(parents=True)
    (root / "tasks" / "reverse" / "validation.jsonl").write_text('{"prompt": "rev:ab=", "answer": "ba"}\n')
    write_manifest(root, {"preset": "micro", "seed": 0, "settings": get_preset("micro").to_dict()})
    return root


def _zoo_edited_beside_user_files(ws: Workspace) -> None:
    root = _zoo_dir(ws)
    (root / "tasks" / "reverse" / "validation.jsonl").write_text('{"prompt": "rev:abc=", "answer": "cba"}\n')
    (root / "notes.txt").write_text("the user's notes")
    (root / "tasks" / "mine").mkdir()
    (root / "tasks" / "mine" / "validation.jsonl").write_text('{"prompt": "p", "answer": "a"}\n')
    cli("zoo", "build", "--out", root, "--preset", "micro", "--rebuild")


def _zoo_edited(ws: Workspace) -> None:
    root = _zoo_dir(ws)
    (root / "tasks" / "reverse" / "validation.jsonl").write_text('{"prompt": "rev:abc=", "answer": "cba"}\n')
    cli("zoo", "build", "--out", root, "--preset", "micro")


def _apply(ws: Workspace, out: Path, *experts: str, flags: tuple[str, ...] = ()) -> None:
    cli("apply", "--base", ws.root / "base", "--experts", *(ws.root / e for e in experts), "--coefficients",
        ",".join(["0.5"] * len(experts)), "--out", out, *flags)


def _apply_over_input_expert(ws: Workspace) -> None:
    shutil.copytree(ws.root / "expert_1", ws.root / "m" / "adapter")
    _apply(ws, ws.root / "m", "expert_0", "m/adapter", flags=("--overwrite",))


def _apply_over_users_folder(ws: Workspace) -> None:
    (ws.root / "m" / "adapter").mkdir(parents=True)
    (ws.root / "m" / "adapter" / "notes.txt").write_text("the user's notes")
    _apply(ws, ws.root / "m", "expert_0", "expert_1", flags=("--overwrite",))


def _apply_run_with_changed_expert(ws: Workspace) -> None:
    """recipe.json as a finished search writes it (base, experts with their content hashes, the release), then an
    expert's weights change."""
    out = ws.start_run()
    experts = [{"name": f"expert_{i}", "path": str(ws.root / f"expert_{i}"),
                "sha256": directory_sha256(ws.root / f"expert_{i}"), "kind": "lora"} for i in range(3)]
    (out / "recipe.json").write_text(json.dumps({
        "base_model": {"path": str(ws.root / "base"), "sha256": directory_sha256(ws.root / "base")},
        "experts": experts, "release": {"name": "record:0", "kind": "searched", "coefficients": [0.4, 0.3, 0.3]}}))
    ws.edit_tensors("expert_1", lambda tensors: tensors.update({k: v * 2 for k, v in tensors.items()}))
    cli("apply", "--run", out, "--out", ws.root / "merged")


def _lineage_over_base_config(ws: Workspace) -> None:
    cli("lineage", ws.start_run(), "--out", ws.root / "base" / "config.json", "--overwrite")


def _lineage_over_users_file(ws: Workspace) -> None:
    out = ws.start_run()
    (ws.root / "notes.dot").write_text("digraph mine { a -> b; }\n")
    cli("lineage", out, "--out", ws.root / "notes.dot", "--overwrite")


CASES: list[Case] = [
    Case("zoo_build_over_users_folder", "`zoo build --out DIR` where DIR is a user's folder holding `base/`, "
         "`tasks/`, `experts/` and other files (no zoo manifest)",
         lambda ws: ([(ws.root / name).mkdir(exist_ok=True) for name in ("tasks", "experts")],
                     cli("zoo", "build", "--out", ws.root, "--preset", "micro")), ZooError,
         r".* is not empty and holds no zoo that evox-merge built \(manifest\.json is missing\); a build "
         r"replaces only a zoo .* choose another directory \(--out, or --zoo-dir for search --zoo\)"),
    Case("search_zoo_dir_users_folder", "`search --zoo --zoo-dir DIR` where DIR is a user's folder (no zoo "
         "manifest)", lambda ws: cli("search", "--zoo", "--zoo-dir", ws.root, "--preset", "micro", "--quiet",
                                     "--out", ws.root / "run"), ZooError,
         r".* is not empty and holds no zoo that evox-merge built \(manifest\.json is missing\)"),
    Case("zoo_rebuild_beside_users_files", "`zoo build --rebuild` over a zoo whose task file was edited and "
         "beside which the user put notes and a task folder", _zoo_edited_beside_user_files, ZooError,
         r"the zoo in .*zoo must be rebuilt \(some of its files are missing or changed\), but .* also holds 2 "
         r"file\(s\) that its manifest\.json does not list \('notes\.txt', 'tasks/mine/validation\.jsonl'\); a "
         r"build never deletes files it did not write: move them out"),
    Case("zoo_build_over_edited_zoo", "`zoo build` over a zoo whose task file was edited (no --rebuild)",
         _zoo_edited, ZooError,
         r"which would discard the changes to 1 of its files since it was built \('tasks/reverse/validation"
         r"\.jsonl'\): copy them elsewhere to keep them, then run: evox-merge zoo build --out .*zoo --preset micro "
         r"--seed 0 --rebuild"),
    Case("apply_out_is_input_expert", "`apply --out m --overwrite` where `m/adapter` is one of `--experts`",
         _apply_over_input_expert, MergeInputError,
         r"--out: .*m/adapter is experts\[1\], an input of this apply; apply never writes over or into its own "
         r"inputs: choose another --out"),
    Case("apply_out_inside_base", "`apply --out BASE` (adapter/ would be written into the base model's folder)",
         lambda ws: _apply(ws, ws.root / "base", "expert_0", "expert_1"), MergeInputError,
         r"--out: .*base/adapter lies inside base \(.*base\), an input of this apply"),
    Case("apply_out_users_folder", "`apply --out m --overwrite` where `m/adapter` is a user's folder",
         _apply_over_users_folder, MergeInputError,
         r"--out: .*m/adapter exists and was not written by evox-merge apply \(no \.evox-merge-written\.json of "
         r"it there\); evox-merge apply replaces only its own output"),
    Case("apply_run_expert_changed", "`apply --run` after an expert's weights changed since the search",
         _apply_run_with_changed_expert, MergeInputError,
         r"--run: expert 'expert_1' \(.*expert_1\) changed since the search: its files' SHA-256 differs from the "
         r"one .*recipe\.json recorded .*modified since the recipe was written: 'adapter_model\.safetensors'"),
    Case("lineage_out_base_config", "`lineage RUN --out BASE/config.json --overwrite` (a file the run read)",
         _lineage_over_base_config, MergeInputError,
         r"--out: .*base/config\.json lies inside the run's base \(.*base\), which the run read; lineage never "
         r"writes over or into a run's inputs"),
    Case("lineage_out_users_file", "`lineage RUN --out notes.dot --overwrite` over a user's own DOT file",
         _lineage_over_users_file, MergeInputError,
         r"--out: .*notes\.dot exists and was not written by evox-merge lineage \(it holds no line with "
         r"lineage's mark\); lineage replaces only its own files"),
]
