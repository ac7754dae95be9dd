"""Benchmark reports that a script rewrites while keeping what a person wrote: below a marker, or outside the
script's own sections."""

from __future__ import annotations

from pathlib import Path


def keep_marker(script: str) -> str:
    """The line after which a report's text is written by hand; `script` (which rewrites the rest) keeps it."""
    return f"<!-- Written by hand below this line; {script} keeps it when it rewrites the tables. -->"


def hand_written(path: Path, script: str) -> str:
    """The part of an existing report after `keep_marker(script)` ("" if there is no such part)."""
    if not path.is_file():
        return ""
    text, marker = path.read_text(), keep_marker(script)
    return text.split(marker, 1)[1].lstrip("\n") if marker in text else ""


def with_hand_written(generated: str, path: Path, script: str) -> str:
    """`generated` followed by the marker and whatever was written by hand below it in `path` before."""
    return f"{generated.rstrip()}\n\n{keep_marker(script)}\n{hand_written(path, script)}"


def replace_section(path: Path, key: str, text: str, title: str = "") -> str:
    """The report at `path` with its section `key` (between ``<!-- section:key -->`` markers) replaced by `text`,
    or appended (to `title` if there is no report yet); everything outside the section is kept."""
    begin, end = f"<!-- section:{key} -->", f"<!-- /section:{key} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = path.read_text() if path.is_file() else title
    if begin in old and end in old:
        return old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    return old.rstrip() + "\n\n" + block + "\n"
