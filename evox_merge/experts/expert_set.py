"""ExpertSet: a base model and N LoRA experts, validated against it and stacked per target layer."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from evox_merge.experts.adapters import CONFIG_NAME, LoraAdapter, read_lora_adapter
from evox_merge.util.errors import MergeInputError
from evox_merge.util.hashing import directory_sha256
from evox_merge.experts.kernel import LayerFactors

logger = logging.getLogger(__name__)
_ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")


@dataclass(eq=False)
class ExpertSet:
    """A base causal LM, its tokenizer and N LoRA experts trained from it.

    Build it with `ExpertSet.load`. ``layers`` maps each Linear layer that any expert targets (module path
    relative to the model, e.g. ``model.layers.0.self_attn.q_proj``) to its `LayerFactors`.
    """

    base_path: str
    model: PreTrainedModel = field(repr=False)
    tokenizer: PreTrainedTokenizerBase = field(repr=False)
    adapters: list[LoraAdapter] = field(repr=False)
    layers: dict[str, LayerFactors] = field(repr=False)

    @property
    def num_experts(self) -> int:
        """N, the length of every coefficient vector."""
        return len(self.adapters)

    @property
    def expert_names(self) -> list[str]:
        """A short name per expert (its directory name)."""
        return [adapter.path.name for adapter in self.adapters]

    @classmethod
    def load(
        cls,
        base: str | Path,
        adapters: Sequence[str | Path],
        *,
        tokenizer: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "ExpertSet":
        """Load a base model and N PEFT LoRA adapter directories, validating everything before any compute.

        Args:
            base: a Hugging Face model directory (or a hub id where the machine is online).
            adapters: N >= 2 PEFT LoRA adapter directories trained from `base`. Ranks, alphas, rsLoRA and target
                modules may differ between experts; a layer an expert does not target gets zero from it.
            tokenizer: tokenizer directory or id; defaults to `base`.
            device: where the model, its factors and the scoring run.
            dtype: the model's dtype (factors are kept in the same dtype).

        Raises:
            MergeInputError: fewer than 2 experts, duplicates, unreadable files, unsupported adapter types, or
                an adapter that does not fit the base (recorded base config, target modules, weight shapes).
        """
        adapter_paths = [Path(a) for a in adapters]
        _check_adapter_list(adapter_paths)
        loaded = [read_lora_adapter(path) for path in adapter_paths]
        _check_no_duplicate_weights(loaded)
        base = str(base)
        _check_recorded_base(loaded, base)
        model = _load_base_model(base, device, dtype)
        tokenizer_path = str(tokenizer) if tokenizer is not None else base
        try:
            loaded_tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        except (OSError, ValueError) as error:
            raise MergeInputError(f"cannot load a tokenizer from {tokenizer_path!r}: {error}") from error
        for adapter in loaded:
            _check_adapter_fits_model(adapter, model)
            _check_adapter_tokenizer(adapter, loaded_tokenizer)
        layers = _stack_factors(loaded, model, device, dtype)
        return cls(base_path=base, model=model, tokenizer=loaded_tokenizer, adapters=loaded, layers=layers)

    def target_module(self, name: str) -> torch.nn.Linear:
        """The base model's Linear layer at module path `name`."""
        return self.model.get_submodule(name)

    @cached_property
    def base_hash(self) -> str:
        """SHA-256 over the base model directory's files ("" for a hub id)."""
        return directory_sha256(self.base_path) if Path(self.base_path).is_dir() else ""

    @cached_property
    def metadata(self) -> list[dict[str, Any]]:
        """Per expert: name, path, content hash, rank per target module, targets, alpha, rsLoRA (for records)."""
        return [
            {
                "name": adapter.path.name,
                "path": str(adapter.path.resolve()),
                "sha256": directory_sha256(adapter.path),
                "ranks": adapter.ranks,
                "target_modules": adapter.modules,
                "lora_alpha": adapter.config["lora_alpha"],
                "use_rslora": bool(adapter.config.get("use_rslora")),
            }
            for adapter in self.adapters
        ]


def _check_adapter_list(paths: list[Path]) -> None:
    if len(paths) < 2:
        raise MergeInputError(f"merging needs at least 2 experts, got {len(paths)}")
    resolved = [path.resolve() for path in paths]
    repeated = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if repeated:
        raise MergeInputError(f"duplicate expert(s): {repeated}")


def _check_no_duplicate_weights(adapters: list[LoraAdapter]) -> None:
    """Two directories holding the same factors are the same expert twice."""
    for index, adapter in enumerate(adapters):
        for earlier in adapters[:index]:
            if earlier.modules == adapter.modules and earlier.scaling == adapter.scaling and all(
                torch.equal(earlier.lora_A[m], adapter.lora_A[m]) and torch.equal(earlier.lora_B[m], adapter.lora_B[m])
                for m in adapter.modules
            ):
                raise MergeInputError(f"duplicate expert: {adapter.path} holds the same weights as {earlier.path}")


def _base_config(base: str) -> dict | None:
    config_path = Path(base, "config.json")
    return json.loads(config_path.read_text()) if config_path.is_file() else None


def _check_recorded_base(adapters: list[LoraAdapter], base: str) -> None:
    """Compare each adapter's recorded base model with the given one where both configs can be read."""
    given = _base_config(base)
    for adapter in adapters:
        recorded_name = adapter.config.get("base_model_name_or_path")
        if not recorded_name:
            continue
        recorded = _base_config(recorded_name) if Path(recorded_name).is_dir() else None
        if given is None or recorded is None:
            if Path(recorded_name).name != Path(base).name:
                logger.warning(
                    "%s: field 'base_model_name_or_path' is %r but the base is %r; checking weight shapes only",
                    adapter.path / CONFIG_NAME, recorded_name, base,
                )
            continue
        differing = [key for key in _ARCHITECTURE_FIELDS if given.get(key) != recorded.get(key)]
        if differing:
            details = ", ".join(f"{key}: {recorded.get(key)!r} vs {given.get(key)!r}" for key in differing)
            raise MergeInputError(
                f"{adapter.path / CONFIG_NAME}: field 'base_model_name_or_path' names {recorded_name!r}, whose "
                f"config differs from the base {base!r} ({details})"
            )


def _load_base_model(base: str, device: str | torch.device, dtype: torch.dtype) -> PreTrainedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    except (OSError, ValueError) as error:
        raise MergeInputError(f"cannot load the base model from {base!r}: {error}") from error
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _check_adapter_fits_model(adapter: LoraAdapter, model: PreTrainedModel) -> None:
    """Every target module must be a Linear layer of the base whose shape matches the factors."""
    where = adapter.path / "adapter_model.safetensors"
    for module_name in adapter.modules:
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise MergeInputError(
                f"{where}: targets module {module_name!r}, which the base model does not have "
                "(was this adapter trained from another base?)"
            ) from None
        if not isinstance(module, torch.nn.Linear):
            raise MergeInputError(f"{where}: targets {module_name!r}, a {type(module).__name__}; only Linear is supported")
        a, b = adapter.lora_A[module_name], adapter.lora_B[module_name]
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise MergeInputError(
                f"{where}: module {module_name!r} factors give a ({b.shape[0]}, {a.shape[1]}) delta but the base "
                f"layer is ({module.out_features}, {module.in_features}); the adapter was trained from another base"
            )


def _check_adapter_tokenizer(adapter: LoraAdapter, tokenizer: PreTrainedTokenizerBase) -> None:
    """An adapter that ships a tokenizer must ship the base's vocabulary."""
    if not (adapter.path / "tokenizer_config.json").is_file():
        return
    adapter_tokenizer = AutoTokenizer.from_pretrained(adapter.path)
    if adapter_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise MergeInputError(f"{adapter.path}: its tokenizer's vocabulary differs from the base tokenizer's")


def _stack_factors(
    adapters: list[LoraAdapter], model: PreTrainedModel, device: str | torch.device, dtype: torch.dtype
) -> dict[str, LayerFactors]:
    """Per target layer, stack A and scaling * B of every expert that targets it."""
    layer_names = sorted({module for adapter in adapters for module in adapter.modules})
    layers = {}
    for name in layer_names:
        a_parts, b_parts, owners = [], [], []
        for index, adapter in enumerate(adapters):
            if name in adapter.lora_A:
                a_parts.append(adapter.lora_A[name])
                b_parts.append(adapter.lora_B[name] * adapter.scaling[name])
                owners.append(torch.full((adapter.rank(name),), index, dtype=torch.long))
        layers[name] = LayerFactors(
            A_cat=torch.cat(a_parts).to(device=device, dtype=dtype),
            B_scaled=torch.cat(b_parts, dim=1).to(device=device, dtype=dtype),
            expert_of_rank=torch.cat(owners).to(device),
        )
    return layers
