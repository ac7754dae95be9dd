"""A safetensors file's header, read without torch or the safetensors package: the one reader that the checks made
before any model loads (`evox_merge.util.adapter_files`, `evox_merge.util.layer_names`) and the dense experts'
tensor index (`evox_merge.experts.dense`) share."""

from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 * 2 ** 20
"""A header larger than this is refused as not a safetensors file (the format's own reader's limit)."""


def read_header(path: str | Path) -> tuple[dict, int]:
    """The JSON header of the safetensors file `path` and the offset where its data begins.

    Raises:
        OSError: the file cannot be read.
        ValueError: not a safetensors header (a short file, a header over `MAX_HEADER_BYTES`, or one that is not
            a JSON object).
    """
    with open(path, "rb") as handle:
        try:
            size = struct.unpack("<Q", handle.read(8))[0]
        except struct.error as error:
            raise ValueError(f"no header length ({error})") from None
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"header of {size} bytes")
        header = json.loads(handle.read(size))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, 8 + size
