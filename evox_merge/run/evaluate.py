"""Score any model, or a model plus a PEFT adapter, on task files: check a release independently."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from evox_merge.util.errors import MergeInputError
from evox_merge.tasks.spec import read_task
from evox_merge.tasks.spec_sources import load_task_specs
from evox_merge.util.hub import read_model_config, resolve_model

logger = logging.getLogger(__name__)
DTYPES = ("auto", "float32", "bfloat16", "float16")


class Scores(dict):
    """Per-task scores and their ``mean`` (a plain dict of them), with what produced them as attributes: ``dtype``
    (the dtype the model was scored in) and ``device``."""

    def __init__(self, scores: dict[str, float | None], dtype: str, device: str) -> None:
        super().__init__(scores)
        self.dtype, self.device = dtype, device


def evaluate_model(
    model_path: str | Path,
    tasks_path: str | Path,
    *,
    adapter: str | Path | None = None,
    split: str = "validation",
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str = "auto",
) -> Scores:
    """Per-task scores (and their weighted ``mean``) of a model directory, with an optional adapter on top; a score
    that is not finite is None (JSON null), and so is the mean then. The model is scored in `dtype` (``auto``:
    bfloat16 on a CUDA device that supports it, else float32, as a search's ``dtype: auto``); the result's
    ``dtype`` attribute says which, and it is logged.

    The model runs as loaded (a PEFT adapter stays unmerged), independently of the in-place merge used in search.
    `model_path` and `adapter` are folders or Hub ids (`evox_merge.util.hub`). Everything that can be checked
    without the model is checked first: the batch size, the task specs and every line of the split's files, the
    model's config.json and the adapter's files (`evox_merge.experts.adapters.read_lora_adapter`); with the
    tokenizer, every example's length against the model's positions (`evox_merge.tasks.batching.check_lengths`);
    while loading, the model's weights (finite); after loading, the adapter's factors must fit the model's layers.

    Raises:
        MergeInputError, TaskFormatError: naming the option, file or field.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MergeInputError(f"--batch-size: must be an integer >= 1, got {batch_size!r}")
    if dtype not in DTYPES:
        raise MergeInputError(f"--dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    from evox_merge.run.config import check_device

    try:
        device = check_device(str(device))
    except ValueError as error:
        raise MergeInputError(f"--device: {error}") from None
    specs = [spec.with_split(split) for spec in load_task_specs(tasks_path)]
    tasks = [read_task(spec) for spec in specs]
    model_source = resolve_model(model_path, "--model")
    model_config = read_model_config(model_source.path, "--model")
    adapter_source = lora = None
    if adapter is not None:
        from evox_merge.experts.adapters import read_lora_adapter

        adapter_source = resolve_model(adapter, "--adapter")
        lora = read_lora_adapter(adapter_source.path)

    import torch
    from transformers import AutoTokenizer

    from evox_merge.experts.expert_set import _check_adapter_fits_model, _check_vocabulary, _load_base_model
    from evox_merge.run.config import resolve_dtype
    from evox_merge.tasks.batching import check_lengths
    from evox_merge.tasks.scorers import build_scorer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_source.path)
    except (OSError, ValueError, TypeError) as error:
        raise MergeInputError(f"--model: cannot load a tokenizer from {model_source.ref!r}: "
                              f"{str(error).splitlines()[0]}") from None
    check_lengths(specs, tokenizer, model_config, model_source.ref)
    dtype = resolve_dtype(dtype, device)
    model = _load_base_model(model_source.path, model_source.ref, "cpu", getattr(torch, dtype))
    _check_vocabulary(tokenizer, model_source.ref, model.get_input_embeddings().num_embeddings,
                      "the model's embedding")
    if lora is not None:
        from peft import PeftModel

        _check_adapter_fits_model(lora, model)
        try:
            model = PeftModel.from_pretrained(model, adapter_source.path)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise MergeInputError(f"--adapter: PEFT cannot load {adapter_source.ref!r} onto {model_source.ref!r}: "
                                  f"{str(error).splitlines()[0]}") from None
    model.to(device).eval()
    scores = {}
    for task in tasks:
        with torch.no_grad():
            scores[task.name] = build_scorer(task, tokenizer, batch_size, device,
                                             model_config=model.config).score(model)
    total = sum(spec.weight for spec in specs)
    mean = sum(scores[spec.name] * spec.weight for spec in specs) / total
    logger.info("scored %s in %s on %s", model_source.ref, dtype, device)
    return Scores({name: value if math.isfinite(value) else None for name, value in {**scores, "mean": mean}.items()},
                  dtype, device)
