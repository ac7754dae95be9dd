"""Nothing lost (issue 28): `zoo build`, `apply`, `lineage` and `search --overwrite` delete or replace only what
they can prove they wrote, never an input of the same command. Each test creates the user's files (notes, a task
folder, a base's config.json, an expert used as input, records.jsonl and history.csv beside a copied run.json), runs
the command as a user would, and checks that those files are still there byte for byte; the positive paths (an
intact zoo reused, a pristine zoo rebuilt, apply over its own output with --overwrite, lineage rerun, a search over
its own earlier or killed run) keep working. The refusals themselves are also in the error table
(tests/error_cases_writes.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import evox_merge.experts.expert_set as expert_set_module
import evox_merge.run.release as release_module
import evox_merge.zoo.build as zoo_build
from error_harness import Workspace, cli, tree
from evox_merge.cli import main
from evox_merge.util.errors import ZooError
from evox_merge.run.run_files import LOCK_NAME, SEARCH_WRITER, run_file_paths, run_id_of
from evox_merge.util.ownership import (RECORD_NAME, STAGING_MARKER, compare, read_record, read_record_fields,
                                      remove_stale_staging)
from evox_merge.zoo import build_zoo, load_zoo
from evox_merge.zoo.presets import get_preset


@pytest.fixture(autouse=True)
def offline_hub(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "hub"))


@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory) -> Path:
    return build_zoo(tmp_path_factory.mktemp("zoo") / "micro", preset="micro", seed=0, progress=False)


@pytest.fixture
def zoo_copy(micro_zoo, tmp_path) -> Path:
    return Path(shutil.copytree(micro_zoo, tmp_path / "zoos" / "micro-seed0"))


@pytest.fixture
def ws(tiny_setup, tmp_path, monkeypatch) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir()
    monkeypatch.chdir(root)
    return Workspace(root, tiny_setup)


@pytest.fixture(scope="module")
def finished(tiny_setup, tmp_path_factory) -> tuple[Workspace, Path]:
    """A workspace and the output folder of a finished search on it (EvoGM, so records name their parents)."""
    root = tmp_path_factory.mktemp("finished")
    ws = Workspace(root, tiny_setup)
    config = ws.write_config(output_dir=str(root / "out"), budget={"generations": 4},
                             algorithm={"name": "evogm", "pop_size": 4, "params": {
                                 "train_steps": 5, "hidden_sizes": [8, 8, 8, 8, 8], "num_rounds": 2,
                                 "iterations_per_round": 2}})
    assert main(["search", str(config), "--quiet"]) == 0
    return ws, root / "out"


def run(capsys, *argv) -> tuple[int, str]:
    """`evox-merge ARGV` as a user runs it: the exit status and what it printed on stderr."""
    capsys.readouterr()
    status = main([str(arg) for arg in argv])
    return status, capsys.readouterr().err


def user_folder(root: Path) -> Path:
    """A user's project that happens to hold tasks/, base/ and experts/ beside their other files."""
    for name, text in {"tasks/mine/validation.jsonl": '{"prompt": "p", "answer": "a"}\n',
                       "base/config.json": '{"model_type": "mine"}', "experts/a/adapter_config.json": "{}",
                       "notes.txt": "the user's notes", "src/main.py": "print('hello')\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


# ---- zoo build ----

def test_zoo_build_never_deletes_a_users_folder(tmp_path, capsys):
    proj = user_folder(tmp_path / "proj")
    before = tree(proj)
    status, err = run(capsys, "zoo", "build", "--out", proj, "--preset", "micro")
    assert status == 2 and "holds no zoo that evox-merge built (manifest.json is missing)" in err
    status, err = run(capsys, "search", "--zoo", "--zoo-dir", proj, "--preset", "micro", "--quiet",
                      "--out", tmp_path / "run")
    assert status == 2 and f"{proj} is not empty and holds no zoo" in err
    (proj / "manifest.json").write_text('{"name": "my project"}')  # a manifest, but not a zoo's
    before = tree(proj)
    status, err = run(capsys, "zoo", "build", "--out", proj, "--preset", "micro", "--rebuild")
    assert status == 2 and "(manifest.json is not an evox-merge zoo manifest)" in err
    assert tree(proj) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # no staging folder, no run folder


def test_zoo_build_over_an_edited_zoo_keeps_the_users_files(zoo_copy, micro_zoo, tmp_path, capsys):
    edited = zoo_copy / "tasks" / "reverse" / "validation.jsonl"
    edited.write_text(edited.read_text() + '{"prompt": "rev:xy=", "answer": "yx"}\n')
    (zoo_copy / "notes.txt").write_text("the user's notes")
    (zoo_copy / "tasks" / "mine").mkdir()
    (zoo_copy / "tasks" / "mine" / "validation.jsonl").write_text('{"prompt": "p", "answer": "a"}\n')
    before = tree(zoo_copy)
    for flags in ([], ["--rebuild"]):  # files the manifest does not list are never deleted, whatever the flags
        status, err = run(capsys, "zoo", "build", "--out", zoo_copy, "--preset", "micro", *flags)
        assert status == 2 and "2 file(s) that its manifest.json does not list ('notes.txt', " \
                               "'tasks/mine/validation.jsonl')" in err and "move them out" in err
        assert tree(zoo_copy) == before
    kept = tmp_path / "kept"
    kept.mkdir()
    shutil.move(zoo_copy / "notes.txt", kept / "notes.txt")
    shutil.move(zoo_copy / "tasks" / "mine", kept / "mine")
    before = tree(zoo_copy)
    status, err = run(capsys, "zoo", "build", "--out", zoo_copy, "--preset", "micro")
    assert status == 2 and "discard the changes to 1 of its files" in err and "--seed 0 --rebuild" in err
    assert tree(zoo_copy) == before
    assert run(capsys, "zoo", "build", "--out", zoo_copy, "--preset", "micro", "--rebuild", "--quiet")[0] == 0
    assert (zoo_copy / "manifest.json").read_bytes() == (micro_zoo / "manifest.json").read_bytes()
    assert tree(zoo_copy) == tree(micro_zoo) and load_zoo(zoo_copy).preset == "micro"
    assert (kept / "notes.txt").read_text() == "the user's notes"
    assert sorted(p.name for p in zoo_copy.parent.iterdir()) == ["micro-seed0"]  # nothing staged or moved aside


def test_an_intact_zoo_is_reused_beside_the_users_notes(zoo_copy, monkeypatch, capsys):
    (zoo_copy / "notes.txt").write_text("the user's notes")
    monkeypatch.setattr(zoo_build, "_build_into", lambda *a: pytest.fail("rebuilt an intact zoo"))
    assert build_zoo(zoo_copy, preset="micro", seed=0, progress=False) == zoo_copy
    assert run(capsys, "zoo", "build", "--out", zoo_copy, "--preset", "micro", "--rebuild")[0] == 0
    assert (zoo_copy / "notes.txt").read_text() == "the user's notes"


def test_a_pristine_zoo_of_other_settings_is_rebuilt_only_when_it_holds_nothing_else(zoo_copy, monkeypatch,
                                                                                      caplog):
    micro = get_preset("micro")
    changed = dataclasses.replace(micro, base_steps=micro.base_steps + 1)
    monkeypatch.setattr(zoo_build, "get_preset", lambda name: changed)
    (zoo_copy / "experts" / "notes.md").write_text("the user's notes")
    before = tree(zoo_copy)
    with pytest.raises(ZooError, match=r"built from other micro settings \(base_steps differ\)\), but .* holds 1 "
                                       r"file\(s\) that its manifest\.json does not list \('experts/notes\.md'\)"):
        build_zoo(zoo_copy, preset="micro", seed=0, progress=False)
    assert tree(zoo_copy) == before
    (zoo_copy / "experts" / "notes.md").unlink()
    with caplog.at_level("WARNING"):
        build_zoo(zoo_copy, preset="micro", seed=0, progress=False)
    assert "rebuilding the zoo in" in caplog.text and "base_steps differ" in caplog.text
    assert load_zoo(zoo_copy).manifest["settings"]["base_steps"] == micro.base_steps + 1


def test_only_our_own_stale_staging_folders_are_removed(tmp_path):
    target = tmp_path / "micro-seed0"
    ours = tmp_path / ".micro-seed0.building-999999999-abc"  # a build killed mid-way: marked, process gone
    (ours / "base").mkdir(parents=True)
    (ours / STAGING_MARKER).write_text("")
    mine = tmp_path / ".micro-seed0.building-999999998-mine"  # the same pattern of name, but not ours
    mine.mkdir()
    (mine / "data.txt").write_text("the user's")
    alive = tmp_path / f".micro-seed0.building-{os.getpid()}-x"  # ours, but its process is this one
    alive.mkdir()
    (alive / STAGING_MARKER).write_text("")
    remove_stale_staging(target, "building")
    assert not ours.exists() and (mine / "data.txt").read_text() == "the user's"


# ---- apply ----

def apply(capsys, ws: Workspace, out: Path, experts: tuple[str, ...] = ("expert_0", "expert_1"),
          coefficients: str = "0.5,0.5", *flags: str) -> tuple[int, str]:
    return run(capsys, "apply", "--base", ws.root / "base", "--experts", *(ws.root / e for e in experts),
               "--coefficients", coefficients, "--out", out, *flags)


def test_apply_never_writes_over_an_input_adapter(ws, capsys):
    shutil.copytree(ws.root / "expert_1", ws.root / "m" / "adapter")
    before = tree(ws.root)
    for flags in ([], ["--overwrite"]):
        status, err = apply(capsys, ws, ws.root / "m", ("expert_0", "m/adapter"), "0.5,0.5", *flags)
        assert status == 2 and "m/adapter is experts[1], an input of this apply" in err
    status, err = apply(capsys, ws, ws.root / "expert_0", ("expert_0", "expert_1"), "0.5,0.5", "--overwrite")
    assert status == 2 and "expert_0/adapter lies inside experts[0]" in err
    assert tree(ws.root) == before


def test_apply_replaces_only_its_own_earlier_output(ws, capsys):
    out = ws.root / "m"
    assert apply(capsys, ws, out)[0] == 0
    adapter = out / "adapter"
    assert not compare(adapter, read_record(adapter, "evox-merge apply"), skip={RECORD_NAME}).changed
    first = load_file(adapter / "adapter_model.safetensors")
    before = tree(ws.root)
    status, err = apply(capsys, ws, out, ("expert_0", "expert_1"), "0.2,0.8")
    assert status == 2 and "holds an earlier output of evox-merge apply; pass --overwrite" in err
    assert tree(ws.root) == before
    assert apply(capsys, ws, out, ("expert_0", "expert_1"), "0.2,0.8", "--overwrite")[0] == 0
    second = load_file(adapter / "adapter_model.safetensors")
    assert any(not first[k].equal(second[k]) for k in first)
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]  # nothing staged or moved aside is left
    (adapter / "notes.txt").write_text("the user's notes")  # the user's file inside apply's folder
    shutil.copytree(ws.root / "expert_2", ws.root / "n" / "adapter")  # the user's own adapter, apply wrote none
    before = tree(ws.root)
    status, err = apply(capsys, ws, out, ("expert_0", "expert_1"), "0.5,0.5", "--overwrite")
    assert status == 2 and "holds 1 file(s) that evox-merge apply did not write ('notes.txt')" in err
    status, err = apply(capsys, ws, ws.root / "n", ("expert_0", "expert_1"), "0.5,0.5", "--overwrite")
    assert status == 2 and "n/adapter exists and was not written by evox-merge apply" in err
    assert tree(ws.root) == before


def test_a_failed_apply_leaves_its_earlier_output_as_it_was(ws, capsys, monkeypatch):
    out = ws.root / "m"
    assert apply(capsys, ws, out)[0] == 0
    before = tree(ws.root)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(release_module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cli("apply", "--base", ws.root / "base", "--experts", ws.root / "expert_0", ws.root / "expert_1",
            "--coefficients", "0.2,0.8", "--out", out, "--overwrite")
    assert tree(ws.root) == before


def test_apply_run_checks_the_experts_hashes_before_the_model_loads(finished, tmp_path, capsys, monkeypatch):
    ws, out = finished
    assert run(capsys, "apply", "--run", out, "--out", tmp_path / "same")[0] == 0
    searched = load_file(out / "best" / "adapter" / "adapter_model.safetensors")
    applied = load_file(tmp_path / "same" / "adapter" / "adapter_model.safetensors")
    assert searched.keys() == applied.keys() and all(searched[k].equal(applied[k]) for k in searched)
    weights = ws.root / "expert_1" / "adapter_model.safetensors"
    original = weights.read_bytes()
    try:
        ws.edit_tensors("expert_1", lambda t: t.update({k: v * 1.01 for k, v in t.items() if "lora_B" in k}))
        monkeypatch.setattr(expert_set_module, "_load_base_model", lambda *a, **k: pytest.fail("the model loaded"))
        status, err = run(capsys, "apply", "--run", out, "--out", tmp_path / "changed")
    finally:
        weights.write_bytes(original)
    assert status == 2 and "--run: expert 'expert_1'" in err and "changed since the search" in err
    assert "'adapter_model.safetensors'" in err and not (tmp_path / "changed").exists()


# ---- lineage ----

def test_lineage_rerun_replaces_its_own_file_and_never_the_users(finished, capsys):
    ws, out = finished
    assert run(capsys, "lineage", out)[0] == 0
    dot = next(out.glob("lineage-*.dot"))
    assert dot.read_text().splitlines()[-1].startswith("// written by evox-merge lineage; sha256 ")
    assert run(capsys, "lineage", out)[0] == 0  # a rerun replaces lineage's own file
    dot.write_text(dot.read_text() + "// my annotation\n")
    edited = dot.read_bytes()
    status, err = run(capsys, "lineage", out)
    assert status == 2 and f"'{dot.name}'" in err and "changed since; pass --overwrite" in err
    assert dot.read_bytes() == edited
    assert run(capsys, "lineage", out, "--overwrite")[0] == 0 and b"my annotation" not in dot.read_bytes()
    config = ws.root / "base" / "config.json"
    (ws.root / "notes.dot").write_text("digraph mine { a -> b; }\n")
    before = tree(ws.root)
    status, err = run(capsys, "lineage", out, "--out", config, "--overwrite")
    assert status == 2 and "lies inside the run's base" in err
    status, err = run(capsys, "lineage", out, "--out", ws.root / "notes.dot", "--overwrite")
    assert status == 2 and "was not written by evox-merge lineage" in err
    status, err = run(capsys, "lineage", out, "--out", out / "records.jsonl", "--overwrite")
    assert status == 2 and "is the run's records.jsonl" in err
    assert tree(ws.root) == before


def test_lineage_replaces_a_png_only_when_its_dot_file_records_it(finished, tmp_path, capsys, monkeypatch):
    _, out = finished
    graphviz = tmp_path / "bin"  # a stand-in for Graphviz's `dot`: writes its DOT input to the -o file
    graphviz.mkdir()
    (graphviz / "dot").write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && o="$2"; shift; done\n'
                                  'cat > "$o"\n')
    (graphviz / "dot").chmod(0o755)
    monkeypatch.setenv("PATH", f"{graphviz}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "photo.png").write_bytes(b"the user's photo")
    status, err = run(capsys, "lineage", out, "--out", tmp_path / "photo.dot")
    assert status == 2 and "photo.png, where lineage writes the PNG beside photo.dot, exists and was not" in err
    assert (tmp_path / "photo.png").read_bytes() == b"the user's photo" and not (tmp_path / "photo.dot").exists()
    assert run(capsys, "lineage", out, "--out", tmp_path / "l.dot")[0] == 0
    png = tmp_path / "l.png"
    assert png.read_bytes().startswith(b"digraph lineage") and run(capsys, "lineage", out, "--out",
                                                                   tmp_path / "l.dot")[0] == 0
    png.write_bytes(b"edited")
    status, err = run(capsys, "lineage", out, "--out", tmp_path / "l.dot")
    assert status == 2 and "'l.png' in" in err and "--overwrite" in err and png.read_bytes() == b"edited"
    assert run(capsys, "lineage", out, "--out", tmp_path / "l.dot", "--overwrite")[0] == 0
    assert png.read_bytes().startswith(b"digraph lineage")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no Graphviz: lineage's own PNG no longer matches
    assert run(capsys, "lineage", out, "--out", tmp_path / "l.dot")[0] == 0 and not png.exists()


# ---- search --overwrite ----

def search_config(ws: Workspace, name: str, out: Path, **overrides) -> Path:
    """A config beside the workspace's files (its paths are relative to it) that writes into `out`."""
    path = ws.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(ws.config(output_dir=str(out), **overrides)))
    return path


def test_search_overwrite_replaces_only_the_files_the_search_recorded(finished, tmp_path, capsys):
    ws, finished_run = finished
    proj = tmp_path / "proj"  # the user's records.jsonl and history.csv beside a run.json copied from a run
    proj.mkdir()
    shutil.copy(finished_run / "run.json", proj / "run.json")
    (proj / "records.jsonl").write_text('{"mine": 1}\n')
    (proj / "history.csv").write_text("my,own,table\n")
    before = tree(proj)
    unproven = "no search recorded writing 'history.csv', 'records.jsonl', 'run.json'"
    for flags, message in (([], "is not empty: pass --resume"), (["--overwrite"], f"--overwrite refused: {unproven}"),
                           (["--resume"], f"holds no checkpoint to continue from, and {unproven}")):
        status, err = _search(capsys, search_config(ws, "proj", proj), *flags)
        assert status == 2 and message in err and tree(proj) == before, (flags, err)
    copy = Path(shutil.copytree(finished_run, tmp_path / "copy"))  # a copy of a run, its record with it, is that run
    (copy / "notes.txt").write_text("the user's notes")
    history = (copy / "history.csv").read_bytes()
    (copy / "history.csv").write_bytes(history + b"# my annotation\n")
    before = tree(copy)
    status, err = _search(capsys, search_config(ws, "copy", copy), "--overwrite")
    assert status == 2 and "'history.csv' changed since the search wrote it" in err and tree(copy) == before
    (copy / "history.csv").write_bytes(history)
    old_id = run_id_of(copy)
    assert _search(capsys, search_config(ws, "copy", copy), "--overwrite")[0] == 0
    assert (copy / "notes.txt").read_text() == "the user's notes" and run_id_of(copy) != old_id
    record = read_record_fields(copy, SEARCH_WRITER)
    assert record["run_id"] == run_id_of(copy) and sorted(record["files"]) == run_file_paths(copy)
    assert not compare(copy, record["files"], skip={RECORD_NAME, "notes.txt"}).changed


def _search(capsys, config: Path, *flags: str) -> tuple[int, str]:
    return run(capsys, "search", config, "--quiet", *flags)


@pytest.mark.slow
def test_a_killed_search_is_overwritable_though_its_record_lags(ws, tmp_path, capsys):
    """A CLI search killed with SIGKILL leaves its lock file, which names its run: --overwrite replaces its run
    files even where they changed after the last record (records of a generation flushed before the checkpoint),
    and keeps the user's file beside them. Without that lock file the same lag is refused, naming the file."""
    out = ws.root / "out"
    config = search_config(ws, "long", out, budget={"generations": 60})
    process = subprocess.Popen([sys.executable, "-m", "evox_merge.cli", "search", str(config), "--quiet"],
                               cwd=ws.root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        checkpoint = out / "checkpoint.pt"
        if checkpoint.exists() and torch.load(checkpoint, weights_only=False)["counters"]["generation"] >= 2:
            break
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert process.returncode == -9 and not (out / "recipe.json").exists()
    assert (out / LOCK_NAME).read_text().splitlines()[1] == run_id_of(out)
    with open(out / "records.jsonl", "a") as handle:  # the next generation's records, flushed, not yet recorded
        handle.write(json.dumps({"id": 10 ** 6}) + "\n")
    (out / "notes.txt").write_text("the user's notes")
    unlocked = Path(shutil.copytree(out, tmp_path / "unlocked"))
    (unlocked / LOCK_NAME).unlink()
    before = tree(unlocked)
    status, err = _search(capsys, search_config(ws, "unlocked", unlocked), "--overwrite")
    assert status == 2 and "'records.jsonl' changed since the search wrote it" in err and tree(unlocked) == before
    assert _search(capsys, search_config(ws, "short", out), "--overwrite")[0] == 0
    assert (out / "notes.txt").read_text() == "the user's notes" and (out / "recipe.json").is_file()
    assert not (out / LOCK_NAME).exists()


# ---- refusals before the heavy imports ----

def test_refusals_and_reuse_need_no_torch(ws, micro_zoo, tmp_path):
    """zoo build's refusal and its reuse of an intact zoo, apply's and lineage's refusals: all from the files, in
    a fresh interpreter that never imports torch, transformers or EvoX."""
    proj = user_folder(tmp_path / "proj")
    shutil.copytree(ws.root / "expert_1", ws.root / "m" / "adapter")
    run_dir = ws.start_run()
    commands = [["zoo", "build", "--out", str(proj), "--preset", "micro"],
                ["zoo", "build", "--out", str(micro_zoo), "--preset", "micro"],
                ["apply", "--base", str(ws.root / "base"), "--experts", str(ws.root / "expert_0"),
                 str(ws.root / "m" / "adapter"), "--coefficients", "1,1", "--out", str(ws.root / "m")],
                ["lineage", str(run_dir), "--out", str(ws.root / "base" / "config.json")]]
    code = ("import sys; from evox_merge.cli import main; "
            f"print([main(argv) for argv in {commands!r}], "
            "[m for m in ('torch', 'transformers', 'evox') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.stdout.splitlines()[-1] == "[2, 0, 2, 2] []", result.stdout + result.stderr
