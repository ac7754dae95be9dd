"""A search's output folder is its own while it runs, and a search that ends early leaves it as it found it.

* The lock: a second search (plain, --resume or --overwrite) on a folder another process holds is refused before
  any model loads, naming the folder and the holder's pid, and changes nothing; a killed holder's lock file is
  taken over; a folder holding only a lock file is an empty one.
* The roll-back: a search that fails before its first checkpoint removes what it wrote and puts back what it
  replaced (a previous run under --overwrite, a failed start, the records a --resume truncated, and the record of
  the files a search wrote).
* The record (`evox_merge.run.run_files`): a search records run.json when it starts, its records and checkpoint at
  every checkpoint and every run file when it ends, however it ends; a search killed before its first checkpoint
  (its lock file naming its run) is started afresh.
* Ctrl-C: exit status 130 and one line that says what was kept and the command that continues; --resume then
  ends where an uninterrupted search does.
* The checks: the CLI makes them before it imports the search (tests/test_fast_refusals.py) and `run_search` again
  for its Python callers; the second check of a resume does not hash the models again unless a file changed.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import evox_merge.experts.expert_set as expert_set_module
import evox_merge.run.output_dir as output_dir_module
import evox_merge.run.search as search_module
from error_cases_runs import HOLD_LOCK, _started_run_with_evidence, killed_start
from error_harness import Workspace, tree
from evox_merge.cli import main
from evox_merge.run.config import load_config
from evox_merge.run.monitor import read_records
from evox_merge.run.output_dir import LOCK_NAME, check_output
from evox_merge.run.run_files import SEARCH_WRITER, run_file_paths, run_id_of
from evox_merge.util.ownership import RECORD_NAME, named_hashes, read_record_fields
from evox_merge.run.search import SearchInterrupted, run_search
from evox_merge.util.errors import MergeInputError, RunStateError


@pytest.fixture
def ws(tiny_setup, tmp_path, monkeypatch) -> Workspace:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return Workspace(tmp_path, tiny_setup)


def _search(ws: Workspace, *flags: str, **overrides) -> int:
    return main(["search", str(ws.write_config(**overrides)), "--quiet", *flags])


def _no_model(monkeypatch) -> None:
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model loaded")
    monkeypatch.setattr(expert_set_module, "_load_base_model", must_not_load)


def _refused_late(monkeypatch) -> None:
    """Refuse the input once the model has loaded and run.json is written (as a check on the built search does)."""
    def refuse(*args, **kwargs):
        raise MergeInputError("algorithm: refused once the model had loaded")
    monkeypatch.setattr(search_module, "build_algorithm", refuse)


def test_a_held_folder_refuses_every_second_search_and_a_killed_holder_releases_it(ws, monkeypatch, capsys):
    out = ws.start_run()
    (out / "mine.txt").write_text("the user's")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(ws.root)
        with monkeypatch.context() as patch:
            _no_model(patch)
            for flags in ([], ["--resume"], ["--overwrite"]):
                assert _search(ws, *flags) == 2, flags
                err = capsys.readouterr().err
                assert err == (f"evox-merge: error: output_dir: {out} is in use by another search (pid {holder.pid} "
                               f"holds {out / LOCK_NAME}); wait for it to end, or choose another output_dir\n")
                assert tree(ws.root) == before, flags
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert (out / LOCK_NAME).read_text() == f"{holder.pid}\n"  # left behind by the killed holder, not held
    (out / "mine.txt").unlink()
    assert _search(ws) == 0  # a failed start and a stale lock file: the search proceeds
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("run", "."))) == [RECORD_NAME, "run.json"]
    assert [r["id"] for r in read_records(out / "records.jsonl")] == [0, 1, 2, 3]


def test_run_search_checks_the_folder_itself(ws, monkeypatch):
    """A Python caller of `run_search` (no CLI checked first) gets the same refusals, before any model loads."""
    _no_model(monkeypatch)
    out = ws.root / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    config = ws.write_config()
    before = tree(ws.root)
    with pytest.raises(MergeInputError, match="is not empty: pass --resume"):
        run_search(config, progress="quiet")
    with pytest.raises(MergeInputError, match="--overwrite refused: .* holds no previous run"):
        run_search(config, overwrite=True, progress="quiet")
    assert tree(ws.root) == before
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(ws.root)
        with pytest.raises(RunStateError, match=f"is in use by another search \\(pid {holder.pid} holds"):
            run_search(config, progress="quiet")
        assert tree(ws.root) == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_resume_check_hashes_each_model_once_until_one_changes(ws, monkeypatch):
    """The CLI's check and `run_search`'s check of the same resume hash the base and the experts once; a file
    changed after the first check is hashed again, and refused."""
    _started_run_with_evidence(ws)
    hashed = []
    real = output_dir_module.directory_sha256

    def counted(folder):
        hashed.append(folder.name)
        return real(folder)
    monkeypatch.setattr(output_dir_module, "directory_sha256", counted)
    config = load_config(ws.root / "search.yaml")
    check_output(config, resume=True, overwrite=False)
    assert sorted(hashed) == ["base", "expert_0", "expert_1", "expert_2"]
    check_output(config, resume=True, overwrite=False)
    assert len(hashed) == 4
    ws.edit_tensors("expert_1", lambda tensors: tensors.update({k: v * 2 for k, v in tensors.items()}))
    with pytest.raises(MergeInputError, match=r"--resume refused: experts\[1\] .*expert_1 changed"):
        check_output(config, resume=True, overwrite=False)
    assert hashed[4:] == ["expert_1"]


def test_a_stale_lock_file_alone_is_an_empty_folder_and_a_refusal_leaves_it(ws, monkeypatch, capsys):
    out = ws.root / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("999999\n")
    (out / "x.txt").write_text("x")
    ws.write_config()
    before = tree(ws.root)
    assert _search(ws) == 2 and "is not empty" in capsys.readouterr().err
    assert tree(ws.root) == before  # the stale lock file's bytes too
    (out / "x.txt").unlink()
    assert _search(ws) == 0
    assert not (out / LOCK_NAME).exists() and (out / "recipe.json").is_file()


def test_a_late_refusal_removes_the_folder_it_created(ws, monkeypatch, capsys):
    _refused_late(monkeypatch)
    ws.write_config(output_dir="runs/a/b")
    before = tree(ws.root)
    assert _search(ws, output_dir="runs/a/b") == 2
    assert "refused once the model had loaded" in capsys.readouterr().err
    assert tree(ws.root) == before and not (ws.root / "runs").exists()


def test_a_late_refusal_puts_back_the_run_that_overwrite_replaced_and_a_failed_start(ws, monkeypatch):
    assert _search(ws) == 0
    out = ws.root / "out"
    (out / "mine.txt").write_text("the user's")
    before = tree(ws.root)
    with monkeypatch.context() as patch:
        _refused_late(patch)
        assert _search(ws, "--overwrite") == 2
    assert tree(ws.root) == before  # the previous run whole, nothing set aside left behind
    assert main(["apply", "--run", str(out), "--out", str(ws.root / "merged")]) == 0  # still a finished run

    failed = killed_start(ws, output_dir="failed")
    assert sorted(p.name for p in failed.iterdir()) == [RECORD_NAME, "records.jsonl", "run.json", LOCK_NAME]
    before = tree(ws.root)
    with monkeypatch.context() as patch:
        _refused_late(patch)
        assert _search(ws, "--resume", output_dir="failed") == 2
    assert tree(ws.root) == before
    assert _search(ws, output_dir="failed") == 0  # started afresh: the killed start's files were its own
    assert (failed / "recipe.json").is_file() and not (failed / LOCK_NAME).exists()


def _interrupt_at_the_second_checkpoint(monkeypatch) -> None:
    real = search_module.save_checkpoint
    calls = []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args, **kwargs)
    monkeypatch.setattr(search_module, "save_checkpoint", save)


def test_an_interrupted_resume_leaves_the_run_as_it_was_and_resumes_exactly(ws, monkeypatch):
    config = ws.write_config(budget={"generations": 3})
    with monkeypatch.context() as patch:
        _interrupt_at_the_second_checkpoint(patch)
        with pytest.raises(SearchInterrupted) as interrupted:
            run_search(config, progress="quiet")
    out = ws.root / "out"
    assert (interrupted.value.output_dir, interrupted.value.generation, interrupted.value.generations) == (out, 1, 3)
    assert sorted(p.name for p in out.iterdir()) == [RECORD_NAME, "checkpoint.pt", "records.jsonl", "run.json"]
    assert len(read_records(out / "records.jsonl")) == 8  # generation 2's records, beyond the checkpoint
    record = read_record_fields(out, SEARCH_WRITER)  # recorded as the interrupted search left them
    assert record["run_id"] == run_id_of(out) and record["files"] == named_hashes(out, run_file_paths(out))
    with open(out / "records.jsonl", "a") as handle:
        handle.write('{"id": 8, "coeffic')  # and a record cut short
    before = tree(ws.root)

    def crash_in_the_next_generation(workflow, monitor, start, stop, after_generation=None):
        workflow.step()
        monitor.flush()
        raise RuntimeError("the machine ran out of something")
    with monkeypatch.context() as patch:
        patch.setattr(search_module, "run_generations", crash_in_the_next_generation)
        with pytest.raises(RuntimeError, match="ran out"):
            run_search(config, resume=True, progress="quiet")
    assert tree(ws.root) == before  # records.jsonl byte for byte, cut-short line included

    resumed = run_search(config, resume=True, progress="quiet")
    straight = run_search(ws.write_config(budget={"generations": 3}, output_dir="straight"), progress="quiet")
    assert resumed.best_coefficients == straight.best_coefficients
    records, reference = read_records(out / "records.jsonl"), read_records(straight.output_dir / "records.jsonl")
    assert [r["id"] for r in records] == list(range(12))
    assert [(r["coefficients"], r["fitness"]) for r in records] == [(r["coefficients"], r["fitness"])
                                                                     for r in reference]
    assert not (out / LOCK_NAME).exists()


def test_ctrl_c_in_another_command_says_what_to_rerun(ws, monkeypatch, capsys):
    import benchmarks.sweep.config as sweep_config_module
    import evox_merge.run.evaluate as evaluate_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate_module, "evaluate_model", interrupted)
    monkeypatch.setattr(sweep_config_module, "load_sweep_config", interrupted)
    evaluate = ["evaluate", "--model", "base", "--tasks", str(ws.tasks_file())]
    assert main(evaluate) == 130
    assert capsys.readouterr().err == ("evox-merge: interrupted: evaluate stopped before it finished and changed no "
                                       f"file; run it again with: {shlex.join(['evox-merge', *evaluate])}\n")
    assert main(["bench", "sweep.yaml", "--workers", "2"]) == 130
    assert capsys.readouterr().err == ("evox-merge: interrupted: the sweep keeps every cell it finished (in its "
                                       "rows.jsonl); continue it with: evox-merge bench sweep.yaml --workers 2\n")


@pytest.mark.slow
def test_ctrl_c_mid_search_exits_130_with_one_line_and_resume_completes(ws, capsys):
    """A real CLI search in a subprocess: a second search on its folder is refused while it runs; SIGINT after its
    second checkpoint ends it with status 130 and one line naming the command that continues, which finishes the
    run where an uninterrupted one ends."""
    config = ws.write_config(budget={"generations": 40})
    process = subprocess.Popen([sys.executable, "-m", "evox_merge.cli", "search", config.name, "--quiet"],
                               cwd=ws.root, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = ws.root / "out" / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=False)["counters"]["generation"] >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGSTOP)  # paused (its lock held) so that it cannot finish before the interrupt
    assert process.poll() is None, "the search finished before it could be interrupted"
    assert main(["search", str(config), "--quiet", "--overwrite"]) == 2
    assert f"is in use by another search (pid {process.pid} holds" in capsys.readouterr().err
    process.send_signal(signal.SIGINT)  # delivered when it continues
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("evox-merge")]
    assert len(lines) == 1 and err.rstrip("\n").endswith(lines[0]), err
    assert lines[0].startswith(f"evox-merge: interrupted: {ws.root / 'out'} keeps the search up to generation ")
    command = lines[0].split("continue it with: ")[1]
    assert command == "evox-merge search search.yaml --quiet --resume"
    assert not (ws.root / "out" / LOCK_NAME).exists()

    assert main(shlex.split(command)[1:]) == 0
    straight = run_search(ws.write_config(budget={"generations": 40}, output_dir="straight"), progress="quiet")
    records = read_records(ws.root / "out" / "records.jsonl")
    assert [r["id"] for r in records] == list(range(160))
    assert [r["coefficients"] for r in records] == [r["coefficients"] for r in
                                                    read_records(straight.output_dir / "records.jsonl")]
    assert json.loads((ws.root / "out" / "recipe.json").read_text())["best"]["coefficients"] == \
        straight.best_coefficients


def test_the_record_follows_each_checkpoint_and_the_end_of_the_search(ws, monkeypatch):
    """After each checkpoint the record holds run.json, records.jsonl and the checkpoint as written; when the
    search ends, every run file; a user's file in the folder is never recorded."""
    seen = []
    real = search_module.save_checkpoint

    def save(path, *args, **kwargs):
        real(path, *args, **kwargs)
        seen.append(read_record_fields(path.parent, SEARCH_WRITER))  # the record before this checkpoint's
    monkeypatch.setattr(search_module, "save_checkpoint", save)
    (ws.root / "out").mkdir()
    config = ws.write_config(budget={"generations": 3})
    result = run_search(config, progress="quiet")
    out = result.output_dir
    assert [sorted(record["files"]) for record in seen] == [["run.json"]] + [
        ["checkpoint.pt", "records.jsonl", "run.json"]] * 2
    assert len({record["files"]["records.jsonl"] for record in seen[1:]}) == 2  # each checkpoint's records
    (out / "notes.txt").write_text("the user's")
    record = read_record_fields(out, SEARCH_WRITER)
    assert record["run_id"] == run_id_of(out) and "notes.txt" not in record["files"]
    assert record["files"] == named_hashes(out, run_file_paths(out)) and "best/adapter/adapter_model.safetensors" in \
        record["files"]
