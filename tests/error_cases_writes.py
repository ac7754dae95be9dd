"""Error-table cases: writes (run by tests/test_errors.py; see tests/error_harness.py).

A command deletes or replaces only what it can prove it wrote, and never an input of the same command: each case
is a refusal that names the path and, where one exists, the flag that allows the write. An output that cannot be
written at all (under a regular file, or in a folder that refuses new files) is refused by every command before any
model loads, naming the path and the flag. tests/test_nothing_lost.py holds the same situations end to end (a real
zoo and a finished search), with the positive paths.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from error_harness import Case, Workspace, cli, search
from evox_merge.run.run_files import CHECKPOINT_FILES, record_run_files, run_id_of
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


def _afile(ws: Workspace) -> Path:
    """A regular file where a folder is expected (`echo hi > afile`)."""
    (ws.root / "afile").write_text("hi\n")
    return ws.root / "afile"


@contextmanager
def immutable_folder(folder: Path) -> Iterator[Path]:
    """`folder` (created) made immutable with ``chattr +i``: no file can be created in it, by root either (the
    tests run as root, for whom permission bits mean nothing). Skips the test, with the reason, where chattr is
    missing or the file system has no immutable flag."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed: no folder that refuses root's writes can be made here")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i {folder} failed ({done.stderr.strip()}): no immutable folders on this file system")
    try:
        try:
            (folder / "probe").write_text("")
        except OSError:
            pass
        else:
            (folder / "probe").unlink()
            pytest.skip(f"{folder} takes new files despite chattr +i")
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def _in_immutable(ws: Workspace, command) -> None:
    with immutable_folder(ws.root / "ro") as folder:
        command(folder)


def _apply_two(ws: Workspace, out: Path) -> None:
    _apply(ws, out, "expert_0", "expert_1")


def _finished_run_record(ws: Workspace) -> Path:
    """A run folder as a search leaves it when it ends (run.json, records, a history, all recorded with the run's
    id), written without a model."""
    out = ws.start_run()
    (out / "records.jsonl").write_text('{"id": 0}\n')
    (out / "history.csv").write_text("generation,best\n0,0.5\n")
    record_run_files(out, run_id_of(out))
    return out


def _copied_run_json_beside_users_files(ws: Workspace) -> None:
    """The user's folder holds their own records.jsonl and history.csv, and a run.json copied from a run."""
    run = ws.start_run(output_dir="elsewhere")
    (ws.root / "out").mkdir()
    shutil.copy(run / "run.json", ws.root / "out" / "run.json")
    (ws.root / "out" / "records.jsonl").write_text('{"mine": true}\n')
    (ws.root / "out" / "history.csv").write_text("my,own,table\n")
    search(ws, "--overwrite")


def _run_file_edited(ws: Workspace) -> None:
    out = _finished_run_record(ws)
    (out / "history.csv").write_text("generation,best\n0,0.5\n# my notes on this run\n")
    (out / "recipe.json").write_text("{}")  # and a file the run never wrote, under a run file's name
    search(ws, "--overwrite")


def _killed_run_without_its_lock(ws: Workspace) -> None:
    """A run killed after a checkpoint (recorded as the checkpoint left them: run.json, records.jsonl, the
    checkpoint) whose next generation's records were flushed before it died, and whose lock file, which named the
    run, was deleted by hand."""
    out = ws.start_run()
    (out / "records.jsonl").write_text('{"id": 0}\n')
    (out / "checkpoint.pt").write_bytes(b"the checkpoint of generation 1")
    record_run_files(out, run_id_of(out), CHECKPOINT_FILES)
    with open(out / "records.jsonl", "a") as handle:
        handle.write('{"id": 1}\n')
    search(ws, "--overwrite")


def _users_files_look_like_a_failed_start(ws: Workspace) -> None:
    """run.json copied beside the user's records.jsonl: once started afresh (both deleted) without a flag."""
    run = ws.start_run(output_dir="elsewhere")
    (ws.root / "out").mkdir()
    shutil.copy(run / "run.json", ws.root / "out" / "run.json")
    (ws.root / "out" / "records.jsonl").write_text('{"mine": true}\n')
    search(ws)


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
    # Outputs that cannot be written: a traceback (exit 1) before, for apply only after the model loaded.
    Case("zoo_build_out_under_file", "`zoo build --out afile/zoo` where `afile` is a regular file",
         lambda ws: cli("zoo", "build", "--out", _afile(ws) / "zoo", "--preset", "micro"), ZooError,
         r"--out: .*afile/zoo lies under .*afile, which is a file; expected a zoo directory in a folder that can be "
         r"created and written"),
    Case("apply_out_under_file", "`apply ... --out afile/m` where `afile` is a regular file",
         lambda ws: _apply_two(ws, _afile(ws) / "m"), MergeInputError,
         r"--out: .*afile/m lies under .*afile, which is a file; expected a folder that can be created and written "
         r"\(apply writes adapter/"),
    Case("search_zoo_dir_under_file", "`search --zoo --zoo-dir afile/zoo` where `afile` is a regular file",
         lambda ws: cli("search", "--zoo", "--preset", "micro", "--zoo-dir", _afile(ws) / "zoo", "--quiet"),
         ZooError, r"--zoo-dir: .*afile/zoo lies under .*afile, which is a file; expected a zoo directory"),
    Case("search_zoo_out_under_file", "`search --zoo --out afile/run` with a zoo to build (the zoo was built "
         "before the output folder was checked)",
         lambda ws: cli("search", "--zoo", "--preset", "micro", "--zoo-dir", ws.root / "zoo", "--out",
                        _afile(ws) / "run", "--quiet"), MergeInputError,
         r"--out: .*afile/run lies under .*afile, which is a file; expected a directory \(new, empty, or a previous "
         r"run's\) that can be created and written"),
    Case("lineage_out_under_file", "`lineage RUN --out afile/l.dot` where `afile` is a regular file",
         lambda ws: cli("lineage", ws.start_run(), "--out", _afile(ws) / "l.dot"), MergeInputError,
         r"--out: .*afile/l\.dot lies under .*afile, which is a file; expected a DOT file path"),
    Case("lineage_out_is_directory", "`lineage RUN --out DIR` where DIR is a folder",
         lambda ws: cli("lineage", ws.start_run(), "--out", ws.root / "data"), MergeInputError,
         r"--out: .*data is a directory; expected a DOT file path"),
    Case("zoo_build_out_not_writable", "`zoo build --out ro/zoo` where `ro` takes no new files (`chattr +i`)",
         lambda ws: _in_immutable(ws, lambda ro: cli("zoo", "build", "--out", ro / "zoo", "--preset", "micro")),
         ZooError, r"--out: .*ro/zoo cannot be written: .*ro, where it would be created, does not take new files "
         r"\(Operation not permitted\)"),
    Case("apply_out_not_writable", "`apply ... --out ro` where `ro` takes no new files (`chattr +i`)",
         lambda ws: _in_immutable(ws, lambda ro: _apply_two(ws, ro)), MergeInputError,
         r"--out: .*ro does not take new files \(Operation not permitted\); expected a folder that can be created "
         r"and written"),
    Case("search_zoo_dir_not_writable", "`search --zoo --zoo-dir ro/zoo` where `ro` takes no new files",
         lambda ws: _in_immutable(ws, lambda ro: cli("search", "--zoo", "--preset", "micro", "--zoo-dir", ro / "zoo",
                                                     "--quiet")), ZooError,
         r"--zoo-dir: .*ro/zoo cannot be written: .*ro, where it would be created, does not take new files"),
    Case("lineage_out_not_writable", "`lineage RUN --out ro/l.dot` where `ro` takes no new files",
         lambda ws: _in_immutable(ws, lambda ro: cli("lineage", ws.start_run(), "--out", ro / "l.dot")),
         MergeInputError, r"--out: .*ro/l\.dot cannot be written: .*ro, where it would be created, does not take "
         r"new files"),
    Case("search_output_dir_not_writable", "`output_dir: ro/run` where `ro` takes no new files",
         lambda ws: _in_immutable(ws, lambda ro: search(ws, output_dir="ro/run")), MergeInputError,
         r"invalid search config: output_dir: .*ro/run cannot be written: .*ro, where it would be created, does not "
         r"take new files"),
    # --overwrite replaces only the run files the search recorded writing, byte for byte.
    Case("overwrite_users_files_beside_copied_run_json", "`search --overwrite` on the user's folder holding their "
         "own `records.jsonl` and `history.csv` and a `run.json` copied from a run",
         _copied_run_json_beside_users_files, MergeInputError,
         r"--overwrite refused: no search recorded writing 'history\.csv', 'records\.jsonl', 'run\.json' in .*out "
         r"\(\.evox-merge-written\.json is missing or unreadable\); --overwrite replaces only the run files whose "
         r"SHA-256 matches what the search recorded"),
    Case("overwrite_run_file_edited", "`search --overwrite` on a run whose `history.csv` the user edited and beside "
         "which they put a `recipe.json`", _run_file_edited, MergeInputError,
         r"--overwrite refused: in .*out, 'history\.csv' changed since the search wrote it and 'recipe\.json' was "
         r"not written by it; .*move them out of .*out \(copy what you want to keep\)"),
    Case("overwrite_killed_run_without_its_lock", "`search --overwrite` on a run killed after a checkpoint whose "
         "records grew after it, its lock file deleted. The rule: --overwrite replaces a run file only if its SHA-256 "
         "is the one the search recorded (run.json with its `run_id` when it starts, records.jsonl and checkpoint.pt "
         "at each checkpoint, every run file when it ends), or if the lock file a killed search leaves names "
         "run.json's `run_id` (then every run file is that run's)", _killed_run_without_its_lock, MergeInputError,
         r"--overwrite refused: in .*out, 'records\.jsonl' changed since the search wrote it; --overwrite replaces "
         r"only the run files whose SHA-256 matches"),
    Case("users_files_look_like_failed_start", "a `run.json` copied beside the user's own `records.jsonl`, no flag "
         "(once taken for a failed start and deleted)", _users_files_look_like_a_failed_start, MergeInputError,
         r"output directory .*out is not empty: pass --resume to continue its run or --overwrite to replace it"),
]
