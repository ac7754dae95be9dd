"""Train the zoo's base model from random initialisation: a weak generalist over every family."""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from evox_merge.zoo.families import draw_base_mixture
from evox_merge.zoo.lm_training import ExampleStream, train
from evox_merge.zoo.presets import ZooPreset


def base_config(preset: ZooPreset, tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    """The Qwen2 decoder of `preset` over `tokenizer`'s vocabulary (tied embeddings)."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=preset.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def train_base(
    preset: ZooPreset, tokenizer: PreTrainedTokenizerBase, seed: int, held_out: set[str], progress: bool
) -> tuple[Qwen2ForCausalLM, float]:
    """A base model trained from random initialisation for `preset.base_steps` steps on every family equally, on
    the families' shorter base inputs, never on a prompt in `held_out`. Returns the model (eval mode) and its
    final training loss."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(base_config(preset, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    stream = ExampleStream(
        draw_base_mixture,
        random.Random(f"evox-merge-zoo:{seed}:base-training"),
        tokenizer,
        held_out,
    )
    loss = train(
        model,
        model.parameters(),
        stream,
        steps=preset.base_steps,
        batch_size=preset.base_batch_size,
        lr=preset.base_lr,
        weight_decay=preset.weight_decay,
        description="base model",
        progress=progress,
    )
    return model, loss
