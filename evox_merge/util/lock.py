"""An exclusive lock on a folder: a lock file inside it, held with ``flock`` for as long as one process works there.

The operating system drops an ``flock`` when its holder exits, however it exits (SIGKILL included), so a lock file
left behind by a killed process is stale, not held: the next process takes it over. The holder writes its pid into
the file (its first line), so a refused process can say who holds the folder, and may add a note (`FolderLock.note`,
the second line: a search notes its run's id there), so that a later process can tell which work a killed holder
left unfinished (`FolderLock.previous_note`, `stale_note`). The holder may remove the file while it still holds it
(`FolderLock.release` with ``remove=True``); a process that locked the removed file meanwhile notices that the path
no longer names the file it locked and starts again.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class FolderBusy(Exception):
    """Another process holds the lock; `holder` is the pid it wrote (``"unknown"`` when unreadable)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by pid {holder}")
        self.path, self.holder = path, holder


class FolderLock:
    """An exclusive, non-blocking lock on the file `path` (created when missing).

    Attributes:
        created: whether `acquire` created the lock file (else it took over a stale one).
        previous: a stale lock file's bytes before `acquire` wrote its pid over them (None when `created`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.created = False
        self.previous: bytes | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and write this process's pid into the lock file.

        Raises:
            FolderBusy: another process holds it.
            OSError: the lock file cannot be created or opened (a folder that cannot be written).
        """
        while True:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:  # removed by its holder between the two calls
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lines(os.pread(fd, 256, 0))[0] or "unknown"
                os.close(fd)
                raise FolderBusy(self.path, holder) from None
            if self._names(fd):
                break
            os.close(fd)  # we locked a file its holder removed: the lock is the file now at `path`
        self.created = created
        self.previous = None if created else self._read(fd)
        self._write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @property
    def previous_note(self) -> str | None:
        """The note a stale lock file held when `acquire` took it over (its holder was killed), or None."""
        return (_lines(self.previous)[1] or None) if self.previous is not None else None

    def note(self, text: str) -> None:
        """Write `text` (one line) after this process's pid in the lock file it holds."""
        if self._fd is not None:
            self._write(self._fd, f"{os.getpid()}\n{text.splitlines()[0] if text else ''}\n".encode())

    def release(self, remove: bool) -> None:
        """Give the lock up: remove the lock file (`remove`), or put a stale file's bytes back (a process that
        must leave the folder exactly as it found it); a lock file this process created is removed either way."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if remove or self.created:
                self.path.unlink(missing_ok=True)
            else:
                self._write(fd, self.previous or b"")
        finally:
            os.close(fd)

    def _names(self, fd: int) -> bool:
        """Whether `path` still names the file open as `fd`."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)

    @staticmethod
    def _read(fd: int) -> bytes:
        chunks, offset = [], 0
        while chunk := os.pread(fd, 1 << 16, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _lines(data: bytes | None) -> tuple[str, str]:
    """The first two lines of a lock file's bytes (the holder's pid and its note), stripped; '' where missing."""
    lines = (data or b"").decode(errors="replace").splitlines()
    return (lines[0].strip() if lines else "", lines[1].strip() if len(lines) > 1 else "")


def stale_note(path: str | Path) -> str | None:
    """The note of the lock file `path` when no process holds it (left by a killed holder), else None (no file, no
    note, or a holder: this process's own `FolderLock` on it included)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        return _lines(FolderLock._read(fd))[1] or None
    finally:
        os.close(fd)  # also drops the shared lock
