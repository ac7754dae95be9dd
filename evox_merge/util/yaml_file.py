"""Read a YAML (or JSON) file into Python data, with errors that name the file and what is wrong.

A key repeated in one mapping is refused (plain YAML keeps the later value without a word), naming the file, the
line and the key. Keys merged in with ``<<`` may be overridden, as YAML intends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evox_merge.util.errors import EvoxMergeError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping (line numbers from 1)."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first_lines:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, first_lines[key])
                first_lines[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, error: type[EvoxMergeError], what: str = "YAML") -> Any:
    """The parsed contents of `path`.

    Raises:
        error: the file is not UTF-8 text, not valid `what` (the message names the file and the position), or
            gives a key twice in one mapping (naming the line and the key).
    """
    path = Path(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except _DuplicateKey as duplicate:
        raise error(f"{path}:{duplicate.line}: duplicate key {duplicate.key!r} (first given at line "
                    f"{duplicate.first_line}); YAML would keep only the later value: give each key once") from None
    except yaml.YAMLError as problem:
        raise error(f"{path}: not valid {what}: {problem}") from None
    except UnicodeDecodeError as problem:
        raise error(f"{path}: not UTF-8 text (byte {problem.start})") from None
