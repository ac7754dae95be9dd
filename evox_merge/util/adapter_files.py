"""PEFT LoRA adapters and task spec files checked from their files alone, without torch: what the config check
(`evox_merge.run.config.resolve_paths`) and the commands ``apply`` and ``evaluate`` refuse before the heavy imports
(4-9 s) and before any model loads.

* The same expert listed twice: the same folder, or two folders with byte-identical weights and the same scaling.
* ``adapter_config.json`` that gives a key twice (`evox_merge.util.hub.read_json_file`).
* A tensor whose rank is not the one the config gives its module (``rank_pattern``, else ``r``), from the
  safetensors header.
* An adapter that leaves the base unchanged: every module's ``lora_B`` (or ``lora_A``) all zeros, from the bytes.
* A task spec file that is a directory.

The safetensors format: 8 bytes (little-endian unsigned) giving the header's length N, then N bytes of JSON mapping
each tensor's name to its ``dtype``, ``shape`` and ``data_offsets`` (begin and end, counted from the byte after the
header), then the tensors' bytes. A float is zero when every bit but its sign bit is zero, so an all-zero check needs
only the bytes (numpy views them as unsigned integers of the dtype's width).

A file these checks cannot read is left to the full checks that load the adapter (`evox_merge.experts.adapters`),
which name the problem; those stay as they are, for Python callers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

from evox_merge.util.errors import MergeInputError
from evox_merge.util.hashing import file_sha256
from evox_merge.util.hub import is_dense_expert, read_json_file, resolve_model
from evox_merge.util.layer_names import LORA_KEY
from evox_merge.util.safetensors_header import read_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
# The adapter_config.json fields that scale a LoRA adapter's factors (two adapters with the same bytes and these
# merge to the same delta).
_SCALING_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors file, from its header: dtype, shape and byte range (absolute offsets)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_safetensors_header(path: Path) -> dict[str, HeaderEntry] | None:
    """Every tensor of the safetensors file `path` by name, from its header alone; None when the file cannot be
    read as safetensors (a short file, a header that is not JSON, offsets outside the file)."""
    try:
        header, data = read_header(path)
        file_size = path.stat().st_size
    except (OSError, ValueError):
        return None
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = (data + int(offset) for offset in info["data_offsets"])
            entries[key] = HeaderEntry(str(info["dtype"]), tuple(int(d) for d in info["shape"]), start, end)
        except (KeyError, TypeError, ValueError):
            return None
        if not data <= start <= end <= file_size:
            return None
    return entries


def pattern_value(patterns: dict | None, module: str) -> tuple[str, object] | None:
    """The first of PEFT's ``rank_pattern`` / ``alpha_pattern`` keys that matches a module path, with its value
    (`peft.utils.other.get_pattern_key`'s rule: the key matches the end of the path at a dot)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern, value
    return None


def _rank_problem(config: dict, entries: dict[str, HeaderEntry], folder: Path) -> str | None:
    """A lora_A tensor whose rank (its first dimension) is not the one the config gives its module."""
    r, patterns = config.get("r"), config.get("rank_pattern") or {}
    if not isinstance(patterns, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                 for v in [r, *patterns.values()]):
        return None  # the full check names a missing or malformed r / rank_pattern
    for key, entry in sorted(entries.items()):
        match = LORA_KEY.match(key)
        if match is None or match["factor"] != "A" or len(entry.shape) != 2:
            continue
        try:
            matched = pattern_value(patterns, match["module"])
        except (re.error, TypeError):
            return None
        expected, source = (matched[1], f"rank_pattern[{matched[0]!r}]") if matched else (r, "r")
        if entry.shape[0] != expected:
            return (f"{folder / WEIGHTS_NAME}: tensor {key!r} has shape {entry.shape} (rank {entry.shape[0]}) but "
                    f"{folder / CONFIG_NAME} gives this module {source} = {expected}; PEFT refuses such an adapter "
                    "and its scaling alpha / r would be wrong. Expected the adapter as PEFT saved it (or a config "
                    "whose r / rank_pattern matches the tensors)")
    return None


def _nonzero(handle: BinaryIO, entry: HeaderEntry) -> bool:
    """Whether the tensor holds a value other than zero (a float's sign bit ignored: -0.0 is zero)."""
    import numpy as np

    handle.seek(entry.start)
    data = handle.read(entry.end - entry.start)
    width = _FLOAT_BYTES.get(entry.dtype)
    if width is None or len(data) % width:
        return any(data)
    values = np.frombuffer(data, dtype=f"<u{width}")
    return bool((values & np.array((1 << (8 * width - 1)) - 1, dtype=values.dtype)).any())


def changes_nothing(weights: Path, entries: dict[str, HeaderEntry]) -> bool:
    """Whether every module of the LoRA adapter file `weights` has an all-zero lora_B or lora_A (an untrained PEFT
    adapter: it leaves the base as it is). Reads lora_B first, and stops at the first module with both nonzero."""
    modules: dict[str, dict[str, HeaderEntry]] = {}
    for key, entry in entries.items():
        match = LORA_KEY.match(key)
        if match is None:
            return False  # not a plain LoRA adapter: the full check says so
        modules.setdefault(match["module"], {})[match["factor"]] = entry
    if not modules or any(set(factors) != {"A", "B"} for factors in modules.values()):
        return False
    with open(weights, "rb") as handle:
        return not any(_nonzero(handle, factors["B"]) and _nonzero(handle, factors["A"])
                       for _, factors in sorted(modules.items()))


def lora_file_problem(folder: Path, what: str, changes_base: bool = True) -> str | None:
    """What the files of the LoRA adapter `folder` (named `what` in the message) show without torch: a key given
    twice in adapter_config.json, a tensor whose rank is not the config's, and (`changes_base`) every module's
    lora_B or lora_A all zeros; None when they show none of these (or cannot be read: the full check says why)."""
    config_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights.is_file():
        return None
    try:
        config = read_json_file(config_path, what)
    except MergeInputError as error:
        return str(error)
    entries = read_safetensors_header(weights)
    if entries is None:
        return None
    if (problem := _rank_problem(config, entries, folder)) is not None:
        return f"{what}: {problem}"
    if changes_base and changes_nothing(weights, entries):
        return (f"{what}: {weights}: every module's lora_B (or lora_A) is all zeros, so this expert leaves the base "
                "unchanged (an untrained adapter?); expected a fine-tuned expert")
    return None


def _scaling(folder: Path) -> str | None:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return json.dumps({key: config.get(key) for key in _SCALING_FIELDS}, sort_keys=True) if isinstance(
        config, dict) else None


def expert_problems(experts: Sequence[tuple[str, str | Path]]) -> list[str]:
    """What the files of a merge's experts, ``(label, local folder or Hub id)`` pairs, show without torch: an
    expert listed twice (the same folder, or byte-identical LoRA weights with the same scaling) and each LoRA
    adapter's `lora_file_problem`. An expert that does not resolve to a folder is left to the check that names
    it; a dense (fully fine-tuned) expert is checked against the base elsewhere."""
    problems: list[str] = []
    seen: dict[Path, str] = {}
    weights: dict[tuple[int, str | None], list[tuple[str, Path]]] = {}  # LoRA experts by file size and scaling
    digests: dict[Path, str] = {}
    for label, ref in experts:
        try:
            folder = Path(resolve_model(ref, label).path)
        except MergeInputError:
            continue
        if not folder.is_dir():
            continue
        real = folder.resolve()
        if real in seen:
            problems.append(f"{label}: {folder} is {seen[real]} again (the same folder); list each expert once")
            continue
        seen[real] = label
        if is_dense_expert(folder):
            continue
        if (problem := lora_file_problem(folder, label)) is not None:
            problems.append(problem)
            continue
        file = folder / WEIGHTS_NAME
        if not file.is_file():
            continue
        alike = weights.setdefault((file.stat().st_size, _scaling(folder)), [])
        same = next((other for other in alike if _digest(digests, file) == _digest(digests, other[1] / WEIGHTS_NAME)),
                    None)
        if same is not None:
            problems.append(f"{label}: {folder} holds the same weights ({WEIGHTS_NAME}, byte for byte) and scaling "
                            f"as {same[0]} ({same[1]}): the same expert twice; list each expert once")
            continue
        alike.append((label, folder))
    return problems


def _digest(digests: dict[Path, str], file: Path) -> str:
    """`file_sha256` of `file`, hashed once."""
    if file not in digests:
        digests[file] = file_sha256(file)
    return digests[file]


def task_spec_file_problem(path: Path, what: str) -> str | None:
    """Why `path` (named `what`) cannot be a task spec file as far as the path tells: a directory (the caller
    reports a missing file in its own words); else None."""
    if path.is_dir():
        return (f"{what}: {path} is a directory; expected a task spec file: YAML or JSON holding a list of task specs "
                "(name, type, path, ...) or a mapping whose 'tasks' key holds one")
    return None
