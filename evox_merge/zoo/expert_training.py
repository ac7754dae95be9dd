"""Fine-tune one LoRA expert per family from the zoo's base model, with PEFT."""

from __future__ import annotations

import copy
import random
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evox_merge.zoo.families import FAMILIES, draw_generation, draw_others
from evox_merge.zoo.lm_training import ExampleStream, train
from evox_merge.zoo.presets import EXPERT_LORA, ZooPreset


def train_expert(
    base: PreTrainedModel,
    family_name: str,
    preset: ZooPreset,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    held_out: set[str],
    progress: bool,
) -> tuple[PeftModel, float]:
    """A LoRA expert of `family_name` (shape from `EXPERT_LORA`), fine-tuned from a copy of `base` on its family,
    with `preset.replay_fraction` of the rows drawn from the other families and anchored to the base's predictions
    (see `batch_loss`). Returns the PEFT model and its final training loss."""
    shape = EXPERT_LORA[family_name]
    config = LoraConfig(
        r=shape.rank,
        lora_alpha=shape.alpha,
        target_modules=list(shape.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed * 1000 + list(FAMILIES).index(family_name) + 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # inside PEFT, not ours
        model = get_peft_model(copy.deepcopy(base), config)
    family = FAMILIES[family_name]
    stream = ExampleStream(
        lambda rng: draw_generation(family, rng),
        random.Random(f"evox-merge-zoo:{seed}:expert:{family_name}"),
        tokenizer,
        held_out,
        replay_draw=lambda rng: draw_others(rng, exclude=family_name),
        replay_fraction=preset.replay_fraction,
    )
    loss = train(
        model,
        [p for p in model.parameters() if p.requires_grad],
        stream,
        steps=preset.expert_steps,
        batch_size=preset.expert_batch_size,
        lr=preset.expert_lr,
        weight_decay=0.0,
        description=f"expert {family_name}",
        progress=progress,
        anchor_weight=preset.anchor_weight,
    )
    return model, loss
