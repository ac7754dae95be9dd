"""Read one PEFT LoRA adapter directory and check it on its own (files, type, fields, tensors)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from evox_merge.util.adapter_files import pattern_value
from evox_merge.util.errors import MergeInputError
from evox_merge.util.hub import read_json_file
from evox_merge.util.layer_names import LORA_KEY

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SUPPORTED_PEFT_TYPES = ("LORA",)


@dataclass
class LoraAdapter:
    """One LoRA expert: per target module path (relative to the causal-LM model), its factors and scaling.

    Attributes:
        path: the adapter directory.
        config: the parsed ``adapter_config.json``.
        lora_A: module path -> ``(r, in)`` tensor.
        lora_B: module path -> ``(out, r)`` tensor.
        scaling: module path -> ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).
    """

    path: Path
    config: dict
    lora_A: dict[str, torch.Tensor] = field(repr=False)
    lora_B: dict[str, torch.Tensor] = field(repr=False)
    scaling: dict[str, float]
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.path.name

    @property
    def modules(self) -> list[str]:
        """The target module paths, sorted."""
        return sorted(self.lora_A)

    def rank(self, module: str) -> int:
        """The LoRA rank of one target module."""
        return self.lora_A[module].shape[0]

    @property
    def ranks(self) -> dict[str, int]:
        """Rank per target module."""
        return {module: self.rank(module) for module in self.modules}


def read_lora_adapter(path: str | Path) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Raises:
        MergeInputError: naming the file and field for a missing or corrupt file, an unsupported adapter type
            or feature, factors whose shapes do not pair up, or a rank other than the config's ``r`` /
            ``rank_pattern`` says (PEFT would refuse to load it; the merge would scale it by the wrong alpha / r).
    """
    path = Path(path)
    if not path.is_dir():
        what = "is a file; expected an adapter directory" if path.exists() else "does not exist"
        raise MergeInputError(f"adapter directory {path} {what}")
    config = _read_config(path / CONFIG_NAME)
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise MergeInputError(f"{weights_path}: missing (a PEFT adapter saved with save_pretrained has it)")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as error:
        raise MergeInputError(f"{weights_path}: not a readable safetensors file ({error})") from error
    lora_A, lora_B = _split_factors(tensors, weights_path)
    _check_ranks(config, tensors, path)
    scaling = {module: _scaling(config, module, lora_A[module].shape[0]) for module in lora_A}
    return LoraAdapter(path=path, config=config, lora_A=lora_A, lora_B=lora_B, scaling=scaling)


def _read_config(config_path: Path) -> dict:
    """Parse adapter_config.json and reject adapter types and features the merge does not support."""
    if not config_path.is_file():
        raise MergeInputError(f"{config_path}: missing (a PEFT adapter saved with save_pretrained has it)")
    config = read_json_file(config_path, "adapter")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise MergeInputError(
            f"{config_path}: field 'peft_type' is {config.get('peft_type')!r}; supported adapter types: "
            f"{', '.join(SUPPORTED_PEFT_TYPES)}"
        )
    unsupported = {
        "use_dora": "DoRA adapters",
        "modules_to_save": "adapters that also save full modules",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
        "lora_bias": "LoRA biases",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise MergeInputError(
                f"{config_path}: field {key!r} is set; {what} are not supported (plain LoRA on Linear layers is)"
            )
    if not isinstance(config.get("lora_alpha"), (int, float)):
        raise MergeInputError(f"{config_path}: field 'lora_alpha' missing or not a number")
    rank_pattern = config.get("rank_pattern") or {}
    ranks = [config.get("r"), *(rank_pattern.values() if isinstance(rank_pattern, dict) else [None])]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise MergeInputError(f"{config_path}: field 'r' missing or not an integer >= 1, or 'rank_pattern' not a "
                              f"mapping of them: got r={config.get('r')!r}, rank_pattern={rank_pattern!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in config.get(key) or {}:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise MergeInputError(f"{config_path}: field {key!r} key {pattern!r} is not a regular expression "
                                      f"({error})") from None
    return config


def _check_ranks(config: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every module's factors (already paired by `_split_factors`) must have the rank the config gives the module
    (its ``rank_pattern`` entry, else ``r``)."""
    for key, a in tensors.items():
        match = LORA_KEY.match(key)
        if match["factor"] != "A":
            continue
        matched = pattern_value(config.get("rank_pattern"), match["module"])
        expected, source = (matched[1], f"rank_pattern[{matched[0]!r}]") if matched else (config["r"], "r")
        if a.shape[0] != expected:
            raise MergeInputError(
                f"{path / WEIGHTS_NAME}: tensor {key!r} has shape {tuple(a.shape)} (rank {a.shape[0]}) but "
                f"{path / CONFIG_NAME} gives this module {source} = {expected}; PEFT refuses such an adapter and "
                "its scaling alpha / r would be wrong. Expected the adapter as PEFT saved it (or a config whose r / "
                "rank_pattern matches the tensors)"
            )


def _split_factors(tensors: dict[str, torch.Tensor], weights_path: Path) -> tuple[dict, dict]:
    """Sort the safetensors entries into A and B factors per module and check that they pair up."""
    lora_A: dict[str, torch.Tensor] = {}
    lora_B: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise MergeInputError(
                f"{weights_path}: tensor {key!r} is not a LoRA A/B factor of a Linear layer; only plain LoRA "
                "adapters are supported"
            )
        target = lora_A if match["factor"] == "A" else lora_B
        target[match["module"]] = tensor.float()
        bad = int((~torch.isfinite(target[match["module"]])).sum())
        if bad:
            raise MergeInputError(f"{weights_path}: tensor {key!r} holds {bad} NaN/inf value(s); expected finite "
                                  "LoRA factors (a diverged or corrupted training run?)")
    if not lora_A:
        raise MergeInputError(f"{weights_path}: holds no LoRA factors")
    if set(lora_A) != set(lora_B):
        unpaired = sorted(set(lora_A) ^ set(lora_B))
        raise MergeInputError(f"{weights_path}: modules with only one of lora_A/lora_B: {unpaired}")
    for module in lora_A:
        a, b = lora_A[module], lora_B[module]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise MergeInputError(
                f"{weights_path}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected (r, in) and (out, r)"
            )
    return lora_A, lora_B


def _scaling(config: dict, module: str, rank: int) -> float:
    """LoRA scaling of one module: alpha / r, or alpha / sqrt(r) with rsLoRA; honours alpha_pattern."""
    matched = pattern_value(config.get("alpha_pattern"), module)
    alpha = matched[1] if matched else config["lora_alpha"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
