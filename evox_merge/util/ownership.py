"""Replace only what we can prove we wrote, never an input, and so that a crash loses nothing.

A command that writes a folder records what it wrote there: ``.evox-merge-written.json`` (`write_record`: the
writer and every file's SHA-256; a zoo's ``manifest.json`` plays the same part). Before it replaces an existing
folder it compares the folder with that record (`compare`): a folder without a record by the same writer, or
holding files the record does not list, is never replaced; files whose bytes changed since are replaced only with
the flag the command names. New content is written into a hidden staging folder beside the target
(`make_staging`, marked with `STAGING_MARKER` so that only our own leftovers are ever cleaned up) and swapped in
whole (`swap_in`); of the folder it replaces, only the recorded files are deleted (`remove_recorded`).
`collision` finds an output that is, holds or lies inside one of the same command's inputs; `output_path_problem`
says, before any work, why an output path cannot be written at all (a file in the way, a file above it, a folder that
refuses new files).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Collection, Iterable, Iterator, Mapping

from evox_merge.util.atomic import write_text_atomic
from evox_merge.util.errors import MergeInputError
from evox_merge.util.hashing import file_sha256

logger = logging.getLogger(__name__)

RECORD_NAME = ".evox-merge-written.json"
STAGING_MARKER = ".evox-merge-staging"
_RECORD_FORMAT = "evox-merge-written"


def folder_files(root: Path, skip: Collection[str] = ()) -> list[str]:
    """Every entry under `root` that is not a directory (files, links, links to directories), by POSIX path
    relative to `root`, sorted; the top-level names in `skip` left out. Links are not followed."""
    names = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        links = [d for d in dirs if (here / d).is_symlink()]
        dirs[:] = [d for d in dirs if d not in links]
        names += [(here / name).relative_to(root).as_posix() for name in (*files, *links)]
    return sorted(name for name in names if name not in skip)


def content_hashes(root: Path, skip: Collection[str] = ()) -> dict[str, str]:
    """SHA-256 of every file under `root` (`folder_files`, which must all be regular files), by relative path."""
    return {name: file_sha256(root / name) for name in folder_files(root, skip)}


@dataclass(frozen=True)
class Differences:
    """How a folder differs from the record of what was written there (relative POSIX paths, sorted).

    Attributes:
        changed: recorded files whose bytes differ now (or that are no longer regular files).
        missing: recorded files that are gone.
        extra: entries the record does not list (someone else's files).
    """

    changed: list[str]
    missing: list[str]
    extra: list[str]


def compare(root: Path, recorded: Mapping[str, str], skip: Collection[str] = ()) -> Differences:
    """Compare the folder `root` with `recorded` (relative path -> SHA-256); top-level names in `skip` (the record
    itself) are neither recorded nor extra."""
    present = set(folder_files(root, skip))
    changed = sorted(name for name in present & set(recorded)
                     if (root / name).is_symlink() or file_sha256(root / name) != recorded[name])
    return Differences(changed=changed, missing=sorted(set(recorded) - present), extra=sorted(present - set(recorded)))


def few(names: list[str], limit: int = 3) -> str:
    """Up to `limit` names, then how many more: ``'a', 'b', 'c' and 4 more``."""
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def safe_names(names: Iterable[str]) -> bool:
    """True if every name is a relative POSIX path that stays inside its folder (no ``..``, not absolute)."""
    return all(isinstance(name, str) and name and not PurePosixPath(name).is_absolute()
               and ".." not in PurePosixPath(name).parts for name in names)


def named_hashes(root: Path, names: Iterable[str]) -> dict[str, str]:
    """SHA-256 of the regular files among the top-level entries `names` of `root` and of every regular file under
    those that are folders, by POSIX path relative to `root` (links and missing names are left out)."""
    hashes = {}
    for name in names:
        path = root / name
        if path.is_symlink() or not path.exists():
            continue
        if path.is_dir():
            hashes.update({f"{name}/{inner}": file_sha256(path / inner) for inner in folder_files(path)
                           if not (path / inner).is_symlink()})
        elif path.is_file():
            hashes[name] = file_sha256(path)
    return hashes


def write_record(folder: Path, written_by: str, files: Mapping[str, str] | None = None, **fields: object) -> None:
    """Record the files `written_by` wrote in `folder` (``RECORD_NAME`` in it, written atomically): `files`
    (relative path -> SHA-256), by default every file of the folder; `fields` are stored beside them (e.g. a run's
    id, `read_record_fields`)."""
    if files is None:
        files = content_hashes(folder, skip={RECORD_NAME, STAGING_MARKER})
    record = {**fields, "format": _RECORD_FORMAT, "written_by": written_by, "files": dict(files)}
    write_text_atomic(folder / RECORD_NAME, json.dumps(record, indent=1, sort_keys=True) + "\n")


def read_record_fields(folder: Path, written_by: str) -> dict | None:
    """The whole record by `written_by` in `folder` (its ``files`` and the fields `write_record` stored), or None
    when the folder holds no readable record by that writer."""
    try:
        record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    files = record.get("files") if isinstance(record, dict) else None
    if (record.get("format") != _RECORD_FORMAT or record.get("written_by") != written_by
            or not isinstance(files, dict) or not safe_names(files)
            or not all(isinstance(digest, str) for digest in files.values())):
        return None
    return record


def read_record(folder: Path, written_by: str) -> dict[str, str] | None:
    """The files (relative path -> SHA-256) that `written_by` recorded in `folder`; None when the folder holds no
    readable record by that writer."""
    record = read_record_fields(folder, written_by)
    return None if record is None else record["files"]


def output_path_problem(path: Path, option: str, expected: str, folder: bool = True,
                        beside: bool = False) -> str | None:
    """Why a command cannot write its output at `path` (named by the command-line `option` or config key), from the
    paths alone, before any work: or None.

    Args:
        expected: what the message says was expected there (e.g. ``a folder that can be created``).
        folder: the output is a folder (an existing file at `path` is refused); else a file (an existing folder at
            `path` is refused).
        beside: the writer creates its files beside `path` (a staging folder or a temporary file it then renames
            onto `path`), so `path`'s parent must take new files; else `path` itself (a folder written into).

    The folder that must take new files is tried by creating (and at once deleting) a hidden empty file in it, or
    in its nearest existing parent where it is yet to be created: permission bits say nothing to root, an
    immutable folder or a read-only file system refuses root too.
    """
    if folder and path.exists() and not path.is_dir():
        return f"{option}: {path} is a file; expected {expected}"
    if not folder and path.is_dir():
        return f"{option}: {path} is a directory; expected {expected}"
    blocker = next((parent for parent in path.parents if parent.exists()), None)
    if blocker is not None and not blocker.is_dir():
        return f"{option}: {path} lies under {blocker}, which is a file; expected {expected}"
    writes_in = path if folder and not beside else path.parent
    tried = writes_in if writes_in.is_dir() else next((p for p in writes_in.parents if p.is_dir()), None)
    if tried is None:
        return None
    try:
        handle, probe = tempfile.mkstemp(dir=tried, prefix=".evox-merge-write-test-")
    except OSError as error:
        reason = error.strerror or str(error)
        if tried == path:
            return f"{option}: {path} does not take new files ({reason}); expected {expected}"
        return (f"{option}: {path} cannot be written: {tried}, where it would be created, does not take new files "
                f"({reason}); expected {expected}")
    os.close(handle)
    os.unlink(probe)
    return None


def check_replace(target: Path, written_by: str, option: str, flag: str, allowed: bool) -> dict[str, str]:
    """Check, before any work, that `written_by` may put a new folder at `target` (the output named by the
    command-line `option`), and return the files it may delete there (none for a new or empty folder).

    A folder is replaced only when it holds a record by `written_by` that lists every entry in it, and only with
    `flag` (`allowed`); recorded files that changed since are named in the message.

    Raises:
        MergeInputError: `target` is a file; holds no record by `written_by`; holds entries the record does not
            list (never deleted, whatever the flags); or is an earlier output and `flag` was not given.
    """
    if not target.exists() and not target.is_symlink():
        return {}
    if not target.is_dir():
        raise MergeInputError(f"{option}: {target} is a file; {written_by} writes a folder there: choose another "
                              f"{option} or move the file away")
    if not any(target.iterdir()):
        return {}
    recorded = read_record(target, written_by)
    if recorded is None:
        raise MergeInputError(f"{option}: {target} exists and was not written by {written_by} (no {RECORD_NAME} "
                              f"of it there); {written_by} replaces only its own output: choose another {option} "
                              "or move that folder away")
    differences = compare(target, recorded, skip={RECORD_NAME})
    if differences.extra:
        raise MergeInputError(f"{option}: {target} holds {len(differences.extra)} file(s) that {written_by} did not "
                              f"write ({few(differences.extra)}); they are never deleted: move them out of {target} "
                              f"or choose another {option}")
    if not allowed:
        edited = (f", and {len(differences.changed)} of its files changed since ({few(differences.changed)})"
                  if differences.changed else "")
        raise MergeInputError(f"{option}: {target} holds an earlier output of {written_by}{edited}; pass {flag} "
                              f"to replace it, or choose another {option}")
    return recorded


def collision(output: Path, inputs: Iterable[tuple[str, Path]]) -> str | None:
    """How `output` collides with one of a command's `inputs` ((what, path) pairs): a phrase such as ``is
    experts[1]`` or ``lies inside base (/x/base)``, or None when it touches none of them. Paths are resolved."""
    out = output.resolve()
    for what, path in inputs:
        path = path.resolve()
        if out == path:
            return f"is {what}"
        if path.is_relative_to(out):
            return f"holds {what} ({path})"
        if out.is_relative_to(path):
            return f"lies inside {what} ({path})"
    return None


def remove_recorded(root: Path, names: Iterable[str]) -> list[str]:
    """Delete the files `names` (relative paths) under `root`, then every folder that is left empty (`root`
    included); nothing else. Returns what remains (entries someone else put there)."""
    real_root = root.resolve()
    for name in names:
        path = root / name
        if path.parent.resolve().is_relative_to(real_root) and (path.is_symlink() or path.is_file()):
            path.unlink()
    for folder, _, _ in sorted(os.walk(root), key=lambda entry: -len(Path(entry[0]).parts)):
        if not os.listdir(folder) and not Path(folder).is_symlink():
            os.rmdir(folder)
    return folder_files(root) if root.exists() else []


def swap_in(staging: Path, target: Path, recorded: Collection[str]) -> None:
    """Put the complete folder `staging` at `target`. An existing `target` (whose files `recorded` lists) is moved
    aside first, so there is no moment without one of the two; of it, only the recorded files are then deleted.
    Anything else found in it (put there while the new one was written) is kept where it was moved, with a
    warning that names the folder."""
    if not target.exists() and not target.is_symlink():
        os.rename(staging, target)
        return
    aside = target.with_name(f".{target.name}.replaced-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(aside, target)
        raise
    left = remove_recorded(aside, recorded)
    if left:
        logger.warning("kept %s: it holds %d file(s) that were not ours (%s); the new output is in %s", aside,
                       len(left), few(left), target)


def make_staging(target: Path, kind: str) -> Path:
    """An empty hidden folder beside `target` (``.<name>.<kind>-<pid>-<random>``) to write its new content into,
    marked with `STAGING_MARKER` (remove the marker before `swap_in`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{kind}-{os.getpid()}-"))
    (staging / STAGING_MARKER).write_text(f"evox-merge staging for {target.name}\n", encoding="utf-8")
    return staging


def remove_stale_staging(target: Path, kind: str) -> None:
    """Delete the staging folders of `target` (`make_staging`) whose process is gone (killed mid-write); a folder
    of that name without our marker is left alone."""
    prefix = f".{target.name}.{kind}-"
    for staging in target.parent.glob(f"{prefix}*"):
        pid = staging.name[len(prefix):].split("-")[0]
        if (pid.isdigit() and (staging / STAGING_MARKER).is_file() and not staging.is_symlink()
                and not _process_alive(int(pid))):
            logger.info("removing %s, left by an interrupted write", staging)
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_folder(target: Path, written_by: str) -> Iterator[Path]:
    """Yield an empty staging folder for `target`'s new content; when the block completes, record its files
    (`write_record`) and swap it in. An existing `target` must hold a record by `written_by` listing every entry
    in it (the caller has checked the flags that allow replacing it: `check_replace`). On an error the staging
    folder is deleted and `target` is left as it was.

    Raises:
        MergeInputError: `target` holds no record by `written_by`, or entries the record does not list.
    """
    recorded = check_replace(target, written_by, "output", flag="", allowed=True)  # the caller checked the flags
    staging = make_staging(target, "writing")
    try:
        yield staging
        (staging / STAGING_MARKER).unlink()
        write_record(staging, written_by)
        recorded = check_replace(target, written_by, "output", flag="", allowed=True)  # it may have changed since
        swap_in(staging, target, [*recorded, RECORD_NAME])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
