"""Read a YAML (or JSON) file into Python data, with errors that name the file and what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evox_merge.util.errors import EvoxMergeError


def read_yaml(path: str | Path, error: type[EvoxMergeError], what: str = "YAML") -> Any:
    """The parsed contents of `path`.

    Raises:
        error: the file is not UTF-8 text, or not valid `what` (the message names the file and the position).
    """
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as problem:
        raise error(f"{path}: not valid {what}: {problem}") from None
    except UnicodeDecodeError as problem:
        raise error(f"{path}: not UTF-8 text (byte {problem.start})") from None
