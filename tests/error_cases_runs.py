"""Error-table cases: runs (run by tests/test_errors.py; see tests/error_harness.py).

The output folder and a run's state: a folder another search holds, a folder that cannot be created, a damaged
records.jsonl, a model changed under a run that is resumed, and a --resume refused after the model loaded (which
must leave the previous run's files as they were). tests/test_run_safety.py holds what the table cannot express
(a real concurrent search, Ctrl-C, the roll-back of a start that fails late).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from error_harness import Case, Workspace, search
from evox_merge.run.config import load_config
from evox_merge.run.output_dir import LOCK_NAME, prepare_output
from evox_merge.util.errors import MergeInputError, RunStateError
from evox_merge.util.hashing import directory_sha256

# A process that takes a folder's lock as a search does, says so, and holds it until it is killed.
HOLD_LOCK = ("import sys, time; from evox_merge.util.lock import FolderLock; FolderLock(sys.argv[1]).acquire(); "
             "print('held', flush=True); time.sleep(120)")
# A search killed before its first checkpoint, as the search's own code leaves it: it claims the folder, writes run.json
# (noting its run's id in the lock file), flushes its first records, and dies (no clean-up runs, the lock is dropped).
KILLED_START = ("import os, sys; from pathlib import Path; from evox_merge.run.config import load_config; "
                "from evox_merge.run.output_dir import OutputClaim, prepare_output; "
                "config = load_config(sys.argv[1]); claim = OutputClaim(Path(config.output_dir)); claim.acquire(); "
                "prepare_output(config, resume=False, overwrite=False, claim=claim); "
                "Path(config.output_dir, 'records.jsonl').write_text(sys.argv[2]); os._exit(9)")


def killed_start(ws: Workspace, **overrides) -> Path:
    """The output folder of a search killed before its first checkpoint (`KILLED_START`), for the workspace's config
    with `overrides`."""
    config = ws.write_config(**overrides)
    done = subprocess.run([sys.executable, "-c", KILLED_START, str(config), _record(0)], capture_output=True,
                          text=True, timeout=60, cwd=ws.root)
    assert done.returncode == 9, done.stderr
    return Path(load_config(config).output_dir)


def _checkpoint(out: Path, records: int, workflow: dict | None = None) -> None:
    """A checkpoint file covering `records` records (its workflow state fits no real search: enough for the
    checks made before the model loads)."""
    torch.save({"workflow": workflow or {}, "torch_rng": torch.random.get_rng_state(), "python_rng": None,
                "numpy_rng": None, "counters": {"generation": 1, "records": records, "best": 0.0, "elapsed": 1.0}},
               out / "checkpoint.pt")


def _record(identifier: int) -> str:
    return json.dumps({"id": identifier, "coefficients": [0.5, 0.5, 0.5], "fitness": 0.1}) + "\n"


def _started_run_with_evidence(ws: Workspace) -> Path:
    """A run interrupted after its first checkpoint, whose run.json records the models' hashes as a search does
    (`ExpertSet.base_hash` and ``metadata``), written without loading a model."""
    config = load_config(ws.write_config())
    evidence = {"base_family": {"base": config.base, "base_sha256": directory_sha256(config.base)},
                "experts": [{"name": Path(e).name, "sha256": directory_sha256(e)} for e in config.experts]}
    prepare_output(config, resume=False, overwrite=False, evidence=evidence)
    out = Path(config.output_dir)
    _checkpoint(out, 4)
    (out / "records.jsonl").write_text("".join(_record(i) for i in range(4)))
    return out


def _corrupt_record_line(ws: Workspace) -> None:
    out = ws.start_run()
    _checkpoint(out, 3)
    (out / "records.jsonl").write_text(_record(0) + '{"id": 1, "coeffi\n' + _record(2) + '{"id": 3, "co')
    search(ws, "--resume")


def _locked_by_another_process(ws: Workspace) -> None:
    out = ws.start_run()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        search(ws, "--overwrite")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def _output_under_a_file(ws: Workspace) -> None:
    (ws.root / "notes.txt").write_text("the user's notes")
    search(ws, output_dir="notes.txt/run")


def _expert_changed_before_resume(ws: Workspace) -> None:
    _started_run_with_evidence(ws)
    ws.edit_tensors("expert_1", lambda tensors: tensors.update({k: v * 2 for k, v in tensors.items()}))
    search(ws, "--resume")


def _base_changed_before_resume(ws: Workspace) -> None:
    _started_run_with_evidence(ws)
    config = json.loads((ws.root / "base" / "config.json").read_text())
    (ws.root / "base" / "config.json").write_text(json.dumps({**config, "rope_theta": 5000.0}))
    search(ws, "--resume")


def _resume_refused_after_load(ws: Workspace) -> None:
    out = ws.start_run()
    _checkpoint(out, 2, workflow={"not_this_search": torch.zeros(3)})
    (out / "records.jsonl").write_text(_record(0) + _record(1) + _record(2) + '{"id": 3, "co')
    search(ws, "--resume")


CASES: list[Case] = [
    Case("records_line_corrupt", "a corrupt line in the middle of `records.jsonl` before `--resume`",
         _corrupt_record_line, RunStateError,
         r"out/records\.jsonl:2: not a record \(Unterminated string starting at: line 1 column 11 \(char 10\)\); "
         r"the file was damaged .*cannot be continued exactly; start again with --overwrite"),
    Case("output_dir_locked", "`search --overwrite` on a folder another search is running in",
         _locked_by_another_process, RunStateError,
         r"output_dir: .*out is in use by another search \(pid \d+ holds .*out/run\.lock\); wait for it to end"),
    Case("output_dir_under_a_file", "`output_dir: notes.txt/run` where `notes.txt` is a file",
         _output_under_a_file, MergeInputError,
         r"output_dir: .*notes\.txt/run lies under .*notes\.txt, which is a file; expected a directory \(new, "
         r"empty, or a previous run's\) that can be created and written"),
    Case("output_dir_not_writable", "`output_dir` where no folder can be created (`/proc/evox-merge-run`)",
         lambda ws: search(ws, output_dir="/proc/evox-merge-run"), MergeInputError,
         r"invalid search config: output_dir: /proc/evox-merge-run cannot be written: /proc, where it would be "
         r"created, does not take new files \(No such file or directory\); expected a directory \(new, empty, or a "
         r"previous run's\) that can be created and written"),
    Case("resume_expert_changed", "`--resume` after an expert's weights changed under the run",
         _expert_changed_before_resume, MergeInputError,
         r"--resume refused: experts\[1\] .*expert_1 changed since the run started \(its files' sha256 differs "
         r"from the one .*out/run\.json recorded\), so the run cannot be continued exactly; start a new run with "
         r"--overwrite"),
    Case("resume_base_changed", "`--resume` after the base's config.json changed under the run",
         _base_changed_before_resume, MergeInputError,
         r"--resume refused: base .*base changed since the run started"),
    Case("resume_refused_after_load", "`--resume` with a checkpoint of another search (refused once the model "
         "has loaded: the run's files stay as they were)", _resume_refused_after_load, RunStateError,
         r"out/checkpoint\.pt: does not fit this search's algorithm and problem .*start again with --overwrite",
         before_model=False),
]
