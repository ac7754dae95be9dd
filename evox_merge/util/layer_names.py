"""Reading a target layer's place from its name, without torch: its transformer block and its module type.

Used by the search spaces (`evox_merge.experts.spaces`) to group layers, and by the config check to count an
adapter's blocks before any model loads (`lora_layer_names` reads only the safetensors header).
"""

from __future__ import annotations

import re
from pathlib import Path

from evox_merge.util.safetensors_header import read_header

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
# A PEFT LoRA adapter's safetensors key: its module path (relative to the causal-LM model) and factor A or B.
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


def block_index(name: str) -> int | None:
    """The transformer block a layer belongs to (``model.layers.3.mlp.up_proj`` -> 3), None if the name has none."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def module_kind(name: str) -> str:
    """``attention`` or ``mlp`` by the layer's name, else the module's own name (e.g. ``lm_head``)."""
    lowered = name.lower()
    if any(key in lowered for key in ("attn", "attention")):
        return "attention"
    if any(key in lowered for key in ("mlp", "ffn", "feed_forward")):
        return "mlp"
    return name.rsplit(".", 1)[-1]


def lora_layer_names(adapter_dir: str | Path) -> list[str]:
    """The target layers of a PEFT LoRA adapter, from its safetensors header alone ([] if it cannot be read: the
    full check of the adapter reports that)."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    try:
        header, _ = read_header(path)
    except (OSError, ValueError):
        return []
    names = {match["module"] for key in header if (match := LORA_KEY.match(key))}
    return sorted(names)
