"""ExpertSet: a base model and N experts (PEFT LoRA adapters and/or fully fine-tuned models), validated against it
and kept per target: LoRA factors stacked per target layer, dense task vectors per parameter
(`evox_merge.experts.dense`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)

from evox_merge.experts.adapters import CONFIG_NAME, LoraAdapter, read_lora_adapter
from evox_merge.experts.dense import (DenseExpert, DenseTarget, build_dense_targets, check_differs_from_base,
                                      check_targets, read_dense_expert, release_freed_memory, safetensors_index)
from evox_merge.util.errors import MergeInputError
from evox_merge.util.hashing import directory_sha256
from evox_merge.util.hub import ModelSource, is_dense_expert, is_hub_id, read_model_config, resolve_model
from evox_merge.experts.kernel import LayerFactors
from evox_merge.tasks.batching import check_lengths
from evox_merge.tasks.spec import TaskSpec

logger = logging.getLogger(__name__)
_ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
# A tokenizer filling less than this share of the embedding rows is another model's (models pad their embedding
# to a multiple of 64 or 128, a few reserve more: DeepSeek-LLM fills 97.7%, Qwen2.5 99.8%).
MIN_VOCABULARY_FILL = 0.9


@dataclass(eq=False)
class ExpertSet:
    """A base model (a causal LM, or an encoder-decoder such as T5), its tokenizer and N experts trained from it: PEFT LoRA adapters, fully fine-tuned models
    (dense experts, `evox_merge.experts.dense`), or a mix.

    Build it with `ExpertSet.load`. ``layers`` maps each Linear layer that any LoRA expert (or an SVD-compressed
    dense one) targets (module path relative to the model, e.g. ``model.layers.0.self_attn.q_proj``) to its
    `LayerFactors`; ``dense`` maps each parameter a dense expert changes (parameter name, e.g.
    ``model.norm.weight``) to its `DenseTarget`. ``target_names`` lists both, layers first: the order of a search
    space's per-target coefficient rows.
    """

    base_path: str
    model: PreTrainedModel = field(repr=False)
    tokenizer: PreTrainedTokenizerBase = field(repr=False)
    adapters: list[LoraAdapter | DenseExpert] = field(repr=False)
    layers: dict[str, LayerFactors] = field(repr=False)
    dense: dict[str, DenseTarget] = field(default_factory=dict, repr=False)
    dense_options: dict[str, Any] = field(default_factory=dict, repr=False)
    base_source: ModelSource | None = field(default=None, repr=False)
    adapter_sources: list[ModelSource] = field(default_factory=list, repr=False)
    tokenizer_info: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def dtype_name(self) -> str:
        """The dtype the base model (and the stacked factors) run in, as a config spells it (``float32``,
        ``bfloat16``, ``float16``): what run.json and recipe.json record."""
        return str(self.model.dtype).removeprefix("torch.")

    @property
    def num_experts(self) -> int:
        """N, the length of every coefficient vector."""
        return len(self.adapters)

    @property
    def target_names(self) -> list[str]:
        """Every merge target: the LoRA-factored layers (module paths), then the dense parameters (names)."""
        return [*self.layers, *self.dense]

    @property
    def targets(self) -> dict[str, "LayerFactors | DenseTarget"]:
        """``target_names`` -> their `LayerFactors` or `DenseTarget`, in that order."""
        return {**self.layers, **self.dense}

    @property
    def expert_names(self) -> list[str]:
        """A short name per expert (its directory name)."""
        return [adapter.name for adapter in self.adapters]

    @classmethod
    def load(
        cls,
        base: str | Path,
        adapters: Sequence[str | Path],
        *,
        tokenizer: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        dense_mode: str = "memory",
        dense_rank: int | None = None,
        dense_targets: Sequence[str] | None = None,
        progress: bool = False,
        task_specs: Sequence[TaskSpec] = (),
    ) -> "ExpertSet":
        """Load a base model and N experts, validating everything before any compute.

        Args:
            base: a Hugging Face model directory, or a Hub id (``org/name[@revision]``) resolved through the local
                Hub cache (`evox_merge.util.hub`).
            adapters: N >= 2 experts trained from `base`: PEFT LoRA adapter directories, full model directories
                (`save_pretrained` with safetensors, sharded or not: dense experts), or Hub ids of either. Ranks,
                alphas, rsLoRA and target modules may differ between LoRA experts; a layer or parameter an expert
                does not change gets zero from it.
            tokenizer: tokenizer directory or Hub id; defaults to `base`.
            device: where the model, its factors and the scoring run.
            dtype: the model's dtype (factors are kept in the same dtype).
            dense_mode, dense_rank, dense_targets: how dense experts' task vectors are kept (``memory``,
                ``stream`` or ``svd`` with a rank) and which parameters are merged (regular expressions; default
                every parameter that differs): `evox_merge.experts.dense`.
            progress: show a progress bar while dense task vectors are computed.
            task_specs: tasks the set will be scored on: every example of their files (validation and test) must fit
                the base's positions (`evox_merge.tasks.batching.check_lengths`), checked with the tokenizer before
                the weights load.

        Everything but the weights' fit to the loaded layers is checked before the model loads: the adapters'
        files and tensors (finite, ranks as their configs say), their recorded base, the dense experts' configs and
        tensor headers against the base's, that no expert is the base itself (`_check_changes_base`), the base's
        config.json, the tokenizer's vocabulary against the base's ``vocab_size`` and the tasks' lengths against its
        positions. The base's weights are checked finite as they load.

        Raises:
            MergeInputError: fewer than 2 experts, duplicates, unreadable files, unsupported adapter types, an
                adapter that does not fit the base (recorded base config, target modules, weight shapes), a
                tokenizer whose vocabulary does not fit the model's embedding, a task example longer than the base's
                positions, or a base weight that is NaN or infinite.
        """
        base_source = resolve_model(base, "base")
        base_config = read_model_config(base_source.path, "base")
        sources = [resolve_model(a, f"experts[{i}]") for i, a in enumerate(adapters)]
        adapter_paths = [Path(source.path) for source in sources]
        _check_adapter_list(adapter_paths)
        base_tensors = (safetensors_index(base_source.path) if any(is_dense_expert(p) for p in adapter_paths)
                        else {})
        loaded: list[LoraAdapter | DenseExpert] = []
        for source, path in zip(sources, adapter_paths):
            if is_dense_expert(path):
                adapter = read_dense_expert(path, base_config, base_tensors, base_source.ref)
            else:
                adapter = read_lora_adapter(path)
            if source.repo_id is not None:
                adapter.name = source.repo_id.split("/")[-1]
            loaded.append(adapter)
        if base_tensors:
            check_targets(dense_targets or (), list(base_tensors))
        for adapter in loaded:
            _check_changes_base(adapter, base_tensors, dense_targets)
        lora = [adapter for adapter in loaded if isinstance(adapter, LoraAdapter)]
        _check_no_duplicate_weights(lora)
        base_name = base_source.repo_id or base_source.path
        _check_recorded_base(lora, base_config, base_name)
        tokenizer_source = resolve_model(tokenizer, "tokenizer") if tokenizer is not None else base_source
        try:
            loaded_tokenizer = AutoTokenizer.from_pretrained(tokenizer_source.path)
        except (OSError, ValueError, TypeError) as error:
            raise MergeInputError(f"tokenizer: cannot load a tokenizer from {tokenizer_source.ref!r}: "
                                  f"{str(error).splitlines()[0]}") from None
        rows = base_config.get("vocab_size")
        if isinstance(rows, int):
            _check_vocabulary(loaded_tokenizer, tokenizer_source.ref, rows, f"{base_source.ref}/config.json vocab_size")
        for adapter in loaded:
            _check_adapter_tokenizer(adapter, loaded_tokenizer)
        files = [spec.with_split(split) for spec in task_specs for split in ("validation", "test")
                 if split == "validation" or spec.test_path is not None]
        check_lengths(files, loaded_tokenizer, base_config, base_source.ref)
        model = _load_base_model(base_source.path, base_source.ref, device, dtype)
        rows = model.get_input_embeddings().num_embeddings
        info = _check_vocabulary(loaded_tokenizer, tokenizer_source.ref, rows, "the base model's embedding")
        for adapter in lora:
            _check_adapter_fits_model(adapter, model)
        dense_experts = [(i, a) for i, a in enumerate(loaded) if isinstance(a, DenseExpert)]
        dense, dense_options = {}, {}
        if dense_experts:
            dense = build_dense_targets(dense_experts, model, base_tensors, dense_mode, dense_rank, dense_targets,
                                        progress=progress)
            dense_options = {"mode": dense_mode, "rank": dense_rank,
                             "targets": list(dense_targets) if dense_targets else None}
        layers = _stack_factors(loaded, model, device, dtype)
        for _, expert in dense_experts:  # their SVD factors now live stacked in `layers`: one copy, not two
            expert.lora_A, expert.lora_B = {}, {}
        if dense_experts:
            release_freed_memory()
        shipping = [a.name for a in loaded if (a.path / "tokenizer_config.json").is_file()]
        info.update(tokenizer=tokenizer_source.to_dict(), experts_shipping_a_tokenizer=shipping)
        return cls(base_path=base_source.ref, model=model, tokenizer=loaded_tokenizer, adapters=loaded, layers=layers,
                   dense=dense, dense_options=dense_options, base_source=base_source, adapter_sources=sources,
                   tokenizer_info=info)

    def target_module(self, name: str) -> torch.nn.Linear:
        """The base model's Linear layer at module path `name`."""
        return self.model.get_submodule(name)

    def target_weight(self, name: str) -> torch.nn.Parameter:
        """The parameter a target writes: a layer's ``weight`` (module path) or a dense target's parameter."""
        return self.model.get_parameter(name) if name in self.dense else self.target_module(name).weight

    @cached_property
    def base_hash(self) -> str:
        """SHA-256 over the base model directory's files (a Hub id's cached snapshot)."""
        folder = self.base_source.path if self.base_source is not None else self.base_path
        return directory_sha256(folder) if Path(folder).is_dir() else ""

    @cached_property
    def metadata(self) -> list[dict[str, Any]]:
        """Per expert (for records): name, path, content hash, kind; a LoRA expert's rank per target module,
        targets, alpha and rsLoRA; a dense expert's count of changed parameters, the dense mode and its SVD
        errors."""
        sources = self.adapter_sources or [None] * len(self.adapters)
        return [
            {
                "name": adapter.name,
                "path": source.ref if source is not None else str(adapter.path.resolve()),
                **({"hub": {"repo_id": source.repo_id, "revision": source.revision, "commit": source.commit}}
                   if source is not None and source.repo_id is not None else {}),
                "sha256": directory_sha256(adapter.path),
                **(_lora_metadata(adapter) if isinstance(adapter, LoraAdapter) else self._dense_metadata(adapter)),
            }
            for adapter, source in zip(self.adapters, sources)
        ]

    def _dense_metadata(self, expert: DenseExpert) -> dict[str, Any]:
        errors = expert.svd_errors
        return {"kind": "dense", "parameters_changed": len(expert.parameters), **self.dense_options,
                **({"svd_max_relative_error": max(errors.values()), "svd_relative_errors": errors} if errors else {})}


def _lora_metadata(adapter: LoraAdapter) -> dict[str, Any]:
    return {"kind": "lora", "ranks": adapter.ranks, "target_modules": adapter.modules,
            "lora_alpha": adapter.config["lora_alpha"], "use_rslora": bool(adapter.config.get("use_rslora"))}


def _check_adapter_list(paths: list[Path]) -> None:
    if len(paths) < 2:
        raise MergeInputError(f"merging needs at least 2 experts, got {len(paths)}")
    resolved = [path.resolve() for path in paths]
    repeated = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if repeated:
        raise MergeInputError(f"duplicate expert(s): {repeated}")


def _check_changes_base(expert: LoraAdapter | DenseExpert, base_tensors: dict, targets: Sequence[str] | None) -> None:
    """An expert that is the base merges to nothing: a LoRA adapter whose every module has an all-zero lora_B or
    lora_A (an untrained PEFT adapter), or a dense copy of the base (`check_differs_from_base`)."""
    if isinstance(expert, DenseExpert):
        check_differs_from_base(expert, base_tensors, targets)
    elif not any(bool(expert.lora_A[m].any()) and bool(expert.lora_B[m].any()) for m in expert.modules):
        raise MergeInputError(f"{expert.path / 'adapter_model.safetensors'}: every module's lora_B (or lora_A) is all "
                              "zeros, so this expert leaves the base unchanged (an untrained adapter?); expected a "
                              "fine-tuned expert")


def _check_no_duplicate_weights(adapters: list[LoraAdapter]) -> None:
    """Two directories holding the same factors are the same expert twice."""
    for index, adapter in enumerate(adapters):
        for earlier in adapters[:index]:
            if earlier.modules == adapter.modules and earlier.scaling == adapter.scaling and all(
                torch.equal(earlier.lora_A[m], adapter.lora_A[m]) and torch.equal(earlier.lora_B[m], adapter.lora_B[m])
                for m in adapter.modules
            ):
                raise MergeInputError(f"duplicate expert: {adapter.path} holds the same weights as {earlier.path}")


def _recorded_config(recorded_name: str) -> dict | None:
    """The config.json of an adapter's recorded base, where it is a local folder or a cached Hub id."""
    if not (Path(recorded_name).is_dir() or is_hub_id(recorded_name)):
        return None
    try:
        return read_model_config(resolve_model(recorded_name, "base_model_name_or_path").path, recorded_name)
    except MergeInputError:
        return None


def _same_name(recorded: str, base: str) -> bool:
    return recorded == base or Path(recorded).name == Path(base).name


def _check_recorded_base(adapters: list[LoraAdapter], given: dict, base: str) -> None:
    """Compare each adapter's recorded base model with the given one where both configs can be read."""
    for adapter in adapters:
        recorded_name = adapter.config.get("base_model_name_or_path")
        if not recorded_name or not isinstance(recorded_name, str):
            continue
        recorded = _recorded_config(recorded_name) if not _same_name(recorded_name, base) or Path(
            recorded_name).is_dir() else None
        if recorded is None:
            if not _same_name(recorded_name, base):
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


def _check_vocabulary(tokenizer: PreTrainedTokenizerBase, ref: str, rows: int, what: str) -> dict[str, Any]:
    """The tokenizer must fit the embedding: no id past its rows, and filling at least MIN_VOCABULARY_FILL of
    them (a much smaller vocabulary is another model's tokenizer). Returns what was checked, for recipe.json."""
    size = len(tokenizer)
    max_id = max(tokenizer.get_vocab().values(), default=-1)
    if max_id >= rows or size > rows:
        raise MergeInputError(
            f"tokenizer: {ref} has {size} tokens (ids up to {max_id}) but {what} has {rows} rows; ids past the "
            "embedding would fail mid-search. Expected the base model's own tokenizer (leave 'tokenizer' unset to "
            "use the base's)"
        )
    if size < MIN_VOCABULARY_FILL * rows:
        raise MergeInputError(
            f"tokenizer: {ref} has {size} tokens but {what} has {rows} rows (under {MIN_VOCABULARY_FILL:.0%} of "
            "them used): it is another model's tokenizer, and its token ids would mean other tokens to this model. "
            "Expected the base model's own tokenizer (leave 'tokenizer' unset to use the base's)"
        )
    return {"tokenizer_size": size, "max_token_id": max_id, "embedding_rows": rows,
            "min_fill": MIN_VOCABULARY_FILL}


def _load_base_model(base: str, ref: str, device: str | torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """The model in folder `base` (named `ref` in messages), on `device` in `dtype`, in eval mode, frozen.

    Raises:
        MergeInputError: the folder does not load, or a loaded parameter holds NaN or infinite values (naming the
            file and the tensor).
    """
    from safetensors import SafetensorError

    try:
        config = AutoConfig.from_pretrained(base)
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        model = auto.from_pretrained(base, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise MergeInputError(f"base: cannot load the model from {ref!r} ({type(error).__name__}: {first}); "
                              "expected a complete save_pretrained folder (config.json and readable weights)") from None
    model.to(device)
    _check_finite_weights(model, base, ref, dtype)  # on the device: a GPU checks a 7B model in milliseconds
    model.eval()
    model.requires_grad_(False)
    return model


def _check_finite_weights(model: PreTrainedModel, base: str, ref: str, dtype: torch.dtype) -> None:
    """Every parameter of a loaded model must be finite: a NaN or inf weight makes every score NaN."""
    parameters = list(model.named_parameters())
    counts = torch.stack([(~torch.isfinite(parameter)).sum() for _, parameter in parameters])
    if bool(counts.any()):  # one synchronisation with the device, not one per parameter
        index = int(counts.nonzero()[0, 0])
        name, bad = parameters[index][0], int(counts[index])
        try:
            file = safetensors_index(base).get(name)
        except MergeInputError:
            file = None
        where = file.file if file is not None else f"{ref} (its weights)"
        raise MergeInputError(f"{where}: tensor {name!r} holds {bad} NaN/inf value(s) as loaded in {dtype}; "
                              "expected finite weights (a corrupted or diverged checkpoint?): every score of this "
                              "model would be NaN")


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
    try:
        adapter_tokenizer = AutoTokenizer.from_pretrained(adapter.path)
    except (OSError, ValueError, TypeError) as error:
        raise MergeInputError(f"{adapter.path}: ships a tokenizer that cannot be loaded "
                              f"({str(error).splitlines()[0]})") from None
    if adapter_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise MergeInputError(f"{adapter.path}: its tokenizer's vocabulary differs from the base tokenizer's")


def _stack_factors(
    adapters: list[LoraAdapter | DenseExpert], model: PreTrainedModel, device: str | torch.device,
    dtype: torch.dtype) -> dict[str, LayerFactors]:
    """Per target layer, stack A and scaling * B of every expert that targets it (dense experts: their
    SVD-compressed factors, if any)."""
    layer_names = sorted({module for adapter in adapters for module in adapter.modules})
    layers = {}
    for name in layer_names:
        a_parts, b_parts, owners = [], [], []
        for index, adapter in enumerate(adapters):
            if name in adapter.lora_A:
                a_parts.append(adapter.lora_A[name])
                b_parts.append(adapter.lora_B[name] * adapter.scaling[name])
                owners.append(torch.full((adapter.lora_A[name].shape[0],), index, dtype=torch.long))
        layers[name] = LayerFactors(
            A_cat=torch.cat(a_parts).to(device=device, dtype=dtype),
            B_scaled=torch.cat(b_parts, dim=1).to(device=device, dtype=dtype),
            expert_of_rank=torch.cat(owners).to(device),
        )
    return layers
