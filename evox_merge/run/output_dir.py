"""A search's output folder: the claim that makes the folder one search's own (`OutputClaim`: its lock, roll-back and
the record of the files it wrote) and the checks that refuse a folder before anything loads (`prepare_output`). The
names of the run files and the rule that proves them a search's own live in `evox_merge.run.run_files`.

Torch-free: the CLI makes the checks (`check_output`) before it imports the search, so that a refused output folder
is said in well under a second, and `evox_merge.run.search.run_search` makes them again under its own claim. Only a
folder holding a checkpoint imports torch, to read the checkpoint's counters (`_check_resumable`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from evox_merge.util.atomic import write_text_atomic
from evox_merge.util.errors import MergeInputError, RunStateError
from evox_merge.util.hashing import directory_sha256
from evox_merge.run.run_files import (CHECKPOINT_FILES, CHECKPOINT_NAME, LOCK_NAME, RECORDS_NAME, RUN_FILES, RUN_NAME,
                                      SEARCH_WRITER, record_run_files, unproven_phrase,
                                      unproven_run_files)
from evox_merge.util.hub import resolve_model
from evox_merge.util.lock import FolderBusy, FolderLock, stale_note
from evox_merge.util.ownership import RECORD_NAME, named_hashes, output_path_problem, write_record

if TYPE_CHECKING:
    from evox_merge.run.config import SearchConfig

logger = logging.getLogger(__name__)

# Hidden folders where the run files a search replaces wait for its first checkpoint (`OutputClaim.set_aside`).
_ASIDE_PREFIX = ".evox-merge-replaced-"
# What a claim replaces and puts back: the run files and the record of them.
_CLAIMED = (*RUN_FILES, RECORD_NAME)
# The claims this process holds, by output folder: the checks read a killed search's note from them (`acquire`
# writes this process's pid over the lock file that held it).
_HELD: dict[Path, "OutputClaim"] = {}


def output_dir_problem(out: Path, option: str = "output_dir") -> str | None:
    """Why `out` cannot be a search's output folder as far as the paths tell (it is a file, lies under one, or
    where it is or would be created no file can be written), or None (`evox_merge.util.ownership.output_path_problem`;
    `option`: how the message names it)."""
    return output_path_problem(out, option, "a directory (new, empty, or a previous run's) that can be created and "
                                            "written")


def task_file_hashes(config: SearchConfig) -> dict[str, str]:
    """SHA-256 of every task file the config names (validation and test), by path."""
    hashes = {}
    for spec in config.task_specs():
        digests = spec.file_hashes()
        hashes[spec.path] = digests["sha256"]
        if spec.test_path is not None:
            hashes[spec.test_path] = digests["test_sha256"]
    return hashes


def _remove(path: Path) -> None:
    """Delete a file, a link or a folder tree (run files only: callers name them from `RUN_FILES`)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


class OutputClaim:
    """One search's hold on its output folder, from before the folder is checked until the search ends.

    `acquire` creates the folder where missing and locks it (``run.lock``, `evox_merge.util.lock`), so a second
    search on the folder is refused while this one runs. Until the search's first checkpoint (`commit`) the run
    files it replaces are set aside rather than deleted (`set_aside`), so that `rollback` can put the folder back
    as `acquire` found it: it removes the run files this search wrote, restores those it set aside and removes the
    folders it created. Only rank 0 of a distributed search holds a claim.
    """

    def __init__(self, out: Path) -> None:
        self.out = out.absolute()
        self.committed = False
        self.run_id: str | None = None  # the run this search writes or continues (`note_run`)
        self.killed_run: str | None = None  # the run a killed search noted in the lock file `acquire` took over
        self._lock = FolderLock(self.out / LOCK_NAME)
        self._created: list[Path] = []  # folders this search created, outermost first
        self._before: set[str] = set()  # the run files present when it took the lock
        self._aside: Path | None = None
        self._set_aside: list[str] = []

    def acquire(self) -> None:
        """Create the output folder where missing and take its lock, before anything is checked or written.

        Raises:
            MergeInputError: output_dir is a file, lies under a file, or cannot be created or written.
            RunStateError: another search holds the folder (named with its pid).
        """
        out = self.out
        if (problem := output_dir_problem(out)) is not None:
            raise MergeInputError(problem)
        missing = [folder for folder in (out, *out.parents) if not folder.exists()]
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._created.append(folder)
            self._lock.acquire()
        except FolderBusy as busy:
            raise RunStateError(f"output_dir: {out} is in use by another search (pid {busy.holder} holds "
                                f"{busy.path}); wait for it to end, or choose another output_dir") from None
        except OSError as error:
            raise MergeInputError(f"output_dir: cannot create or write {out} ({error.strerror or error}: "
                                  f"{error.filename}); expected a folder that can be created and written") from None
        self._before = {name for name in _CLAIMED if _present(out / name)}
        self.killed_run = self._lock.previous_note
        _HELD[out] = self

    def note_run(self, run_id: str | None) -> None:
        """The search writes (or continues) run `run_id` here: note it in the lock file, where it stays if this
        process is killed (`evox_merge.run.run_files`)."""
        self.run_id = run_id
        if run_id is not None:
            self._lock.note(run_id)

    def set_aside(self, name: str, copy: bool = False) -> None:
        """The search is about to delete (or, with `copy`, change in place) the run file `name`: move (copy) it into
        a hidden folder where it waits for `commit` (deleted) or `rollback` (put back)."""
        path = self.out / name
        if not _present(path) or name in self._set_aside:  # nothing to keep, or its original is safe already
            if not copy:
                _remove(path)
            return
        if self._aside is None:
            self._aside = Path(tempfile.mkdtemp(dir=self.out, prefix=_ASIDE_PREFIX))
        if copy:
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, self._aside / name)
        else:
            os.rename(path, self._aside / name)
        self._set_aside.append(name)

    def commit(self) -> None:
        """The search wrote a checkpoint: record run.json, records.jsonl and the checkpoint as they are now; at the
        first, what it set aside (and what a killed search left aside) goes."""
        if self.run_id is not None and self._lock.held:
            record_run_files(self.out, self.run_id, CHECKPOINT_FILES)
        if self.committed:
            return
        self.committed = True
        for folder in self.out.glob(f"{_ASIDE_PREFIX}*"):
            shutil.rmtree(folder, ignore_errors=True)

    def rollback(self) -> None:
        """Before `commit`: put the output folder back as `acquire` found it (after it, nothing to undo)."""
        if self.committed:
            return
        _HELD.pop(self.out, None)
        if self._lock.held:
            for name in _CLAIMED:
                if name != LOCK_NAME and (name not in self._before or name in self._set_aside):
                    _remove(self.out / name)
            for name in self._set_aside:
                os.rename(self._aside / name, self.out / name)
            if self._aside is not None:
                self._aside.rmdir()
            self._lock.release(remove=False)
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:  # someone put a file there meanwhile: it stays, with its folder
                break

    def release(self) -> None:
        """The search ended: record every run file it leaves (after its first checkpoint, however it ended), then
        remove the lock file (a no-op after `rollback`)."""
        _HELD.pop(self.out, None)
        try:
            if self.committed and self.run_id is not None and self._lock.held:
                record_run_files(self.out, self.run_id)
        finally:
            self._lock.release(remove=True)


@contextmanager
def ctrl_c_ignored() -> Iterator[None]:
    """Ignore SIGINT in the block (only the main thread can, and only where Python set its handler; elsewhere the
    block runs as it is)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check_output(config: SearchConfig, resume: bool, overwrite: bool) -> None:
    """Make `prepare_output`'s checks under a claim of the folder, then put the folder back as it was: what the CLI
    runs before it imports the search (`run_search` makes the same checks again under its own claim).

    Raises:
        MergeInputError, RunStateError: as `OutputClaim.acquire` and `prepare_output`.
    """
    claim = OutputClaim(Path(config.output_dir))
    try:
        claim.acquire()
        prepare_output(config, resume, overwrite, write=False)
    finally:
        with ctrl_c_ignored():
            claim.rollback()


def check_output_folder(out: Path, resume: bool, overwrite: bool, option: str = "output_dir") -> None:
    """The checks of `check_output` that need no config, for a search whose config is not known yet (``search
    --zoo`` checks its output folder before it builds the zoo): the path (`option` names it), the lock, and the
    flags against what the folder holds.

    Raises:
        MergeInputError, RunStateError: as `check_output`.
    """
    if (problem := output_dir_problem(out.absolute(), option)) is not None:
        raise MergeInputError(problem)
    claim = OutputClaim(out)
    try:
        claim.acquire()
        _, unproven = _folder_state(claim.out, resume, overwrite)
        if unproven is not None:
            raise MergeInputError(unproven)
    finally:
        with ctrl_c_ignored():
            claim.rollback()


def _killed_run(out: Path) -> str | None:
    """The run id a killed search noted in `out`'s lock file (read by this process's claim when it holds one)."""
    claim = _HELD.get(out.absolute())
    return claim.killed_run if claim is not None else stale_note(out / LOCK_NAME)


def _folder_state(out: Path, resume: bool, overwrite: bool) -> tuple[bool, str | None]:
    """The checks of the folder against the flags that need no config: whether it holds only a failed start of a
    search (run.json, perhaps records.jsonl, no checkpoint, proven ours: `evox_merge.run.run_files`), and the
    refusal of the run files a replacement would delete that cannot be proven a search's own (None: all can)."""
    if (problem := output_dir_problem(out)) is not None:
        raise MergeInputError(problem)
    entries = sorted(p.name for p in out.iterdir()
                     if not p.name.startswith(".") and p.name != LOCK_NAME) if out.is_dir() else []
    if resume and not (out / RUN_NAME).is_file():
        raise MergeInputError(f"--resume: {out} holds no run to resume ({RUN_NAME} missing)")
    if not entries:
        return False, None
    looks_failed = set(entries) <= {RUN_NAME, RECORDS_NAME} and RUN_NAME in entries
    replaces = looks_failed or (overwrite if not resume else not (out / CHECKPOINT_NAME).exists())
    changed, unrecorded, why = unproven_run_files(out, _killed_run(out)) if replaces else ([], [], None)
    failed_start = looks_failed and not changed + unrecorded
    if resume:
        if not failed_start and not (out / CHECKPOINT_NAME).exists() and changed + unrecorded:
            raise MergeInputError(f"--resume refused: {out} holds no checkpoint to continue from, and "
                                  f"{unproven_phrase(out, changed, unrecorded, why)}; a search replaces only its own "
                                  f"files: move them out of {out}, or choose another output_dir")
        return failed_start, None
    if failed_start:
        return True, None
    if not overwrite:
        raise MergeInputError(
            f"output directory {out} is not empty: pass --resume to continue its run or --overwrite to replace it"
        )
    if not (out / RUN_NAME).is_file():
        raise MergeInputError(
            f"--overwrite refused: {out} holds no previous run ({RUN_NAME} missing) but {len(entries)} other "
            f"entr{'y' if len(entries) == 1 else 'ies'} (e.g. {entries[:3]}); evox-merge deletes only its own "
            "runs: choose a new or empty output_dir"
        )
    if not changed + unrecorded:
        return False, None
    return False, (f"--overwrite refused: {unproven_phrase(out, changed, unrecorded, why)}; --overwrite replaces "
                   f"only the run files whose SHA-256 matches what the search recorded ({RECORD_NAME}), and never "
                   f"deletes others: move them out of {out} (copy what you want to keep), or choose another output_dir")


def prepare_output(config: SearchConfig, resume: bool, overwrite: bool, write: bool = True,
                   evidence: dict[str, Any] | None = None, claim: OutputClaim | None = None) -> dict[str, Any]:
    """Check, then (with `write`) clear the output directory and write run.json; return the run's metadata (saved
    or new). With ``write=False`` only the checks run, so a refusal comes before anything loads.

    A directory holding only a failed start (run.json, perhaps records.jsonl, no checkpoint) of a search is started
    afresh, with or without --resume; a lock file alone (``run.lock``, left by a killed search) is an empty
    directory. --overwrite deletes only the files a run writes (`RUN_FILES`), only where run.json shows a previous
    run, only files proven that run's own (`evox_merge.run.run_files`: their SHA-256 as the search recorded it) and
    never a file or folder the config reads. A new run.json gets a new ``run_id`` and is recorded with it.
    `evidence` (the run-constant evidence fields, `evox_merge.run.evidence.run_evidence`) is written into a new
    run.json. With the search's `claim` on the folder the files it replaces are set aside until its first checkpoint
    (`OutputClaim.set_aside`), not deleted, and the run's id is noted in the lock file (`OutputClaim.note_run`).

    Raises:
        MergeInputError: output_dir is a file, lies under one or cannot be written, a folder that is not empty
            without --resume or --overwrite, --overwrite on a folder without a run, whose run holds a file the
            config reads, or whose run files are not proven a search's own, --resume without a run or with a
            changed config, task file or model.
        RunStateError: a run.json, checkpoint or records.jsonl that --resume cannot continue from.
    """
    out = Path(config.output_dir)
    failed_start, unproven = _folder_state(out, resume, overwrite)
    hashes = task_file_hashes(config)
    if resume:
        try:
            run = json.loads((out / RUN_NAME).read_text(encoding="utf-8"))
            saved_config, saved_hashes = run["config"], run["task_hashes"]
        except (ValueError, KeyError, TypeError) as error:
            raise RunStateError(f"{out / RUN_NAME}: not a readable run description ({error}); start again with "
                                "--overwrite") from None
        if not failed_start:
            current = config.model_dump(mode="json")
            # Keys added since a run was written: their defaults did what the run did before they existed.
            saved_config = {"objectives": "mean", "batch_tokens": None, "subsample": None, **saved_config}
            if saved_config != current:
                changed = sorted(k for k in {*saved_config, *current} if saved_config.get(k) != current.get(k))
                raise MergeInputError(f"--resume: the config differs from the run's in {changed}")
            changed_files = sorted(path for path, digest in saved_hashes.items() if hashes.get(path) != digest)
            if changed_files:
                raise MergeInputError(
                    f"--resume refused: task file(s) changed since the run started: {changed_files}; "
                    "start a new run (--overwrite) to search on the new data"
                )
            _check_models_unchanged(config, run, out)
            _check_resumable(out)
            if write and claim is not None:
                claim.note_run(run.get("run_id"))
            return run
        logger.info("%s: the previous start failed before its first checkpoint; starting afresh", out)
    elif overwrite and (out / RUN_NAME).is_file() and not failed_start:
        owned = [(out / name).resolve() for name in RUN_FILES]
        inside = sorted(str(p) for p in _config_inputs(config) for o in owned if p == o or o in p.parents)
        if inside:
            raise MergeInputError(f"--overwrite refused: the config reads {inside}, inside the previous run in "
                                  f"{out} that --overwrite would delete; copy them elsewhere first")
        if unproven is not None:
            raise MergeInputError(unproven)
    if not write:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    for name in _CLAIMED:  # a failed start's files, or (--overwrite) a previous run's, and the record of them
        if name != LOCK_NAME:
            if claim is not None:
                claim.set_aside(name)
            else:
                _remove(out / name)
    run_id = uuid.uuid4().hex
    if claim is not None:
        claim.note_run(run_id)
    run = {"run_id": run_id, "config": config.model_dump(mode="json"), "task_hashes": hashes, "started": time.time(),
           **({"evidence": evidence} if evidence is not None else {})}
    write_text_atomic(out / RUN_NAME, json.dumps(run, indent=2))
    write_record(out, SEARCH_WRITER, named_hashes(out, [RUN_NAME]), run_id=run_id)
    return run


def _config_inputs(config: SearchConfig) -> list[Path]:
    """The local files and folders the config reads (Hub ids live in the Hub cache, outside any run)."""
    paths = [config.base, *config.experts, *([config.tokenizer] if config.tokenizer else [])]
    for spec in config.tasks if isinstance(config.tasks, list) else []:
        paths += [spec.get("path"), spec.get("test_path")]
    return [Path(p).resolve() for p in paths if p and Path(p).is_absolute()]


def _check_resumable(out: Path) -> None:
    """Before any model loads: the checkpoint is readable and records.jsonl holds every record it covers, each a
    readable record. Only a folder holding a checkpoint imports torch (to read it) and EvoX (with the records)."""
    if not (out / CHECKPOINT_NAME).exists():
        return
    from evox_merge.run.checkpoint import read_checkpoint_counters
    from evox_merge.run.monitor import read_records

    covered = read_checkpoint_counters(out / CHECKPOINT_NAME)["records"]
    records = out / RECORDS_NAME
    try:
        complete = len(read_records(records, limit=covered)) if records.is_file() else 0
    except RunStateError as error:
        raise RunStateError(f"{error}, so the run cannot be continued exactly; start again with --overwrite") from None
    if complete < covered:
        raise RunStateError(f"{records} holds {complete} complete records but {out / CHECKPOINT_NAME} covers "
                            f"{covered}: records were lost, so the run cannot be continued exactly; start again "
                            "with --overwrite")


# Model folders found as a run.json recorded them, by (folder, sha256), with their files' sizes and times then: the
# CLI checks before it imports the search and `run_search` checks again, and the second check hashes only a folder
# whose listing changed meanwhile.
_UNCHANGED: dict[tuple[Path, str], list[tuple[str, int, int, int]]] = {}


def _listing(folder: Path) -> list[tuple[str, int, int, int]]:
    """The files `directory_sha256` hashes in `folder`, each with its size and modification and change times."""
    return sorted((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
                  for path in folder.rglob("*") if path.is_file() for stat in (path.stat(),))


def _hashes_as_recorded(folder: Path, digest: str) -> bool:
    """Whether `directory_sha256(folder)` is `digest` (not hashed again where a check found it so and no file's
    size or times changed since)."""
    listing = _listing(folder)
    if _UNCHANGED.get((folder, digest)) == listing:
        return True
    if directory_sha256(folder) != digest:
        return False
    _UNCHANGED[(folder, digest)] = listing
    return True


def first_changed_model(recorded: list[tuple[str, str, str | None]]) -> tuple[int, Path] | None:
    """``(index, folder)`` of the first of `recorded` ``(what, local path or Hub id, recorded directory_sha256)``
    whose files no longer hash as recorded (None when all do; an empty record is not checked). Loads no model."""
    for index, (what, ref, digest) in enumerate(recorded):
        folder = Path(resolve_model(ref, what).path)
        if digest and not _hashes_as_recorded(folder, digest):
            return index, folder
    return None


def _check_models_unchanged(config: SearchConfig, run: dict[str, Any], out: Path) -> None:
    """Before any model loads, on --resume: the base and the experts hash as run.json's evidence recorded them
    (`ExpertSet.base_hash` and ``metadata``: `directory_sha256` of each model's folder). A run from before evidence
    was recorded has nothing to compare.

    Raises:
        MergeInputError: naming the first model folder whose files changed since the run started.
    """
    evidence = run.get("evidence")
    if not isinstance(evidence, dict):
        return
    recorded = [("base", config.base, (evidence.get("base_family") or {}).get("base_sha256"))]
    recorded += [(f"experts[{index}]", ref, expert.get("sha256"))
                 for index, (ref, expert) in enumerate(zip(config.experts, evidence.get("experts") or []))]
    changed = first_changed_model(recorded)
    if changed is not None:
        what, folder = recorded[changed[0]][0], changed[1]
        raise MergeInputError(f"--resume refused: {what} {folder} changed since the run started (its files' "
                              f"sha256 differs from the one {out / RUN_NAME} recorded), so the run cannot be "
                              "continued exactly; start a new run with --overwrite")
