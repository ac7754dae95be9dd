"""Score any model, or a model plus a PEFT adapter, on task files: check a release independently."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from evox_merge.util.errors import MergeInputError
from evox_merge.tasks.scoring import build_scorer
from evox_merge.tasks import load_task_specs, read_task


def evaluate_model(
    model_path: str | Path,
    tasks_path: str | Path,
    *,
    adapter: str | Path | None = None,
    split: str = "validation",
    batch_size: int = 32,
    device: str = "cpu",
) -> dict[str, float]:
    """Per-task scores (and their weighted ``mean``) of a model directory, with an optional adapter on top.

    The model runs as loaded (a PEFT adapter stays unmerged), independently of the in-place merge used in search.
    """
    specs = [spec.with_split(split) for spec in load_task_specs(tasks_path)]
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise MergeInputError(f"cannot load a model and tokenizer from {model_path}: {error}") from error
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.to(device).eval()
    scores = {}
    for spec in specs:
        with torch.no_grad():
            scores[spec.name] = build_scorer(read_task(spec), tokenizer, batch_size, device).score(model)
    total = sum(spec.weight for spec in specs)
    scores["mean"] = sum(scores[spec.name] * spec.weight for spec in specs) / total
    return scores
