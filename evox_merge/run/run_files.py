"""The files a search writes in its output folder, and the proof that files there are a search's own.

A search records what it wrote (`evox_merge.util.ownership`'s record, ``.evox-merge-written.json``, written by
``evox-merge search``): run.json and the run's id when it starts (run.json holds the same ``run_id``), records.jsonl
and checkpoint.pt again after every checkpoint, and every run file when it ends, however it ends (an error or
Ctrl-C after its first checkpoint included). The rule `unproven_run_files` applies before a search deletes or
replaces run files (``--overwrite``, or starting afresh over a failed start):

* run.json must be recorded with its bytes (SHA-256) and its ``run_id`` must be the record's;
* every other file under the run-file names (`RUN_FILES`) must have the bytes the record gives it;
* except for a run of ours that was killed: the search notes its run's id in its lock file (``run.lock``), which a
  killed search leaves behind, unheld. When that note names run.json's ``run_id``, every file under the run-file
  names is that run's own, whatever the record says (the record lags a killed run by the records and checkpoint
  of at most one generation, and by the release files when it was killed while writing them).

Anything else (a run.json copied from another folder, a user's own records.jsonl or history.csv beside a run, a
run file edited since) is never deleted: the search refuses, naming the files. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

from evox_merge.util.ownership import (RECORD_NAME, few, folder_files, named_hashes, read_record_fields,
                                      write_record)

RUN_NAME = "run.json"
LOCK_NAME = "run.lock"
RECORDS_NAME = "records.jsonl"
CHECKPOINT_NAME = "checkpoint.pt"
MERGEVOLVE_RECORDS = "mergevolve_records.jsonl"
PARETO_FILES = ("champion", "specialists", "challengers", "pareto_front.png")
# Every name a run writes in its output directory: --overwrite deletes these and nothing else (the lock file, held
# by the search that deletes them, is removed when that search ends).
RUN_FILES = (RUN_NAME, RECORDS_NAME, CHECKPOINT_NAME, LOCK_NAME, "best", "recipe.json", "README.md", "history.csv",
             "fitness.png", "coefficients.png", "task_scores.png", MERGEVOLVE_RECORDS, *PARETO_FILES)
SEARCH_WRITER = "evox-merge search"
# The run files a search rewrites at every checkpoint (the rest it writes once, when it starts or ends).
CHECKPOINT_FILES = (RUN_NAME, RECORDS_NAME, CHECKPOINT_NAME)


def present_run_files(out: Path) -> list[str]:
    """The run-file names present in `out` (the lock file left out)."""
    return [name for name in RUN_FILES if name != LOCK_NAME and ((out / name).exists() or (out / name).is_symlink())]


def run_file_paths(out: Path) -> list[str]:
    """Every entry under the run-file names in `out` that is not a folder, by POSIX path relative to `out`."""
    paths = []
    for name in present_run_files(out):
        path = out / name
        inner = folder_files(path) if path.is_dir() and not path.is_symlink() else None
        paths += [name] if inner is None else [f"{name}/{entry}" for entry in inner]
    return sorted(paths)


def run_id_of(out: Path) -> str | None:
    """The ``run_id`` that run.json in `out` holds (None: no readable run.json, or one without an id)."""
    try:
        run = json.loads((out / RUN_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    run_id = run.get("run_id") if isinstance(run, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


def record_run_files(out: Path, run_id: str, names: tuple[str, ...] | None = None) -> None:
    """Record the run files of run `run_id` in `out` as they are now: only `names` (keeping what an earlier record
    of the same run says of the others), or every run file (dropping the rest)."""
    files = named_hashes(out, present_run_files(out) if names is None else names)
    if names is not None:
        earlier = read_record_fields(out, SEARCH_WRITER)
        if earlier is not None and earlier.get("run_id") == run_id:
            files = {**{path: digest for path, digest in earlier["files"].items()
                        if path.split("/")[0] not in names}, **files}
    write_record(out, SEARCH_WRITER, files, run_id=run_id)


# The run files' hashes by folder, with their sizes and times then: the CLI's check and the search's own checks of
# the same folder hash a previous run's files once (a release may hold a full model) unless one changed meanwhile.
_HASHED: dict[Path, tuple[list[tuple[str, int, int, int]], dict[str, str]]] = {}


def _current_hashes(out: Path) -> dict[str, str]:
    """`named_hashes` of the run files in `out`, hashed again only where a file's size or times changed."""
    stats = [(path, (out / path).lstat()) for path in run_file_paths(out)]
    listing = [(path, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns) for path, stat in stats]
    memo = _HASHED.get(out.absolute())
    if memo is not None and memo[0] == listing:
        return memo[1]
    hashes = named_hashes(out, present_run_files(out))
    _HASHED[out.absolute()] = (listing, hashes)
    return hashes


def unproven_run_files(out: Path, killed_run: str | None) -> tuple[list[str], list[str], str | None]:
    """The files under the run-file names in `out` that cannot be proven a search's own (module docstring), as
    ``(changed, unrecorded, why)``: files whose bytes differ from the record's, files the record does not list (all
    of them when there is no usable record) and, then, why the record is not usable (None when it is).
    `killed_run`: the run id a killed search noted in the folder's lock file, if any."""
    paths = run_file_paths(out)
    run_id = run_id_of(out)
    if not paths or (run_id is not None and run_id == killed_run):
        return [], [], None
    record = read_record_fields(out, SEARCH_WRITER)
    if record is None:
        return [], paths, f"{RECORD_NAME} is missing or unreadable"
    if run_id is None or record.get("run_id") != run_id:
        return [], paths, f"{RECORD_NAME} records another run than {out / RUN_NAME}"
    recorded, current = record["files"], _current_hashes(out)
    changed = [path for path in paths if path in recorded and current.get(path) != recorded[path]]
    unrecorded = [path for path in paths if path not in recorded]
    return changed, unrecorded, None


def unproven_phrase(out: Path, changed: list[str], unrecorded: list[str], why: str | None) -> str:
    """Which run files in `out` are not proven a search's own and why, for a refusal (`unproven_run_files`)."""
    if why is not None:
        return f"no search recorded writing {few(unrecorded)} in {out} ({why})"
    parts = ([f"{few(changed)} changed since the search wrote {'it' if len(changed) == 1 else 'them'}"]
             if changed else [])
    parts += [f"{few(unrecorded)} {'was' if len(unrecorded) == 1 else 'were'} not written by it"] if unrecorded else []
    return f"in {out}, " + " and ".join(parts)
