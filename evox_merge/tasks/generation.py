"""Batched greedy decoding with a KV cache, stop strings and early exit."""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evox_merge.tasks.batching import PromptBatch


def cache_argument(model: PreTrainedModel) -> str:
    """The name under which this transformers version passes the KV cache (``cache`` since 5.x); a PEFT model
    passes it through to its base model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    cut = min((index for index in (text.find(s) for s in stop if s) if index >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: PromptBatch,
    max_new_tokens: int,
    stop: Sequence[str],
) -> list[str] | None:
    """Greedy completions of a left-padded prompt batch, each cut at its first stop string or EOS.

    Decoding ends as soon as every row has stopped. Returns None if the model produced non-finite logits.
    """
    eos_id = tokenizer.eos_token_id
    rows = batch.input_ids.shape[0]
    attention_mask = batch.attention_mask
    cache_name = cache_argument(model)
    output = model(
        input_ids=batch.input_ids,
        attention_mask=attention_mask,
        position_ids=batch.position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    next_positions = batch.position_ids[:, -1:] + 1
    generated: list[list[int]] = [[] for _ in range(rows)]
    texts = [""] * rows
    done = [False] * rows
    for step in range(max_new_tokens):
        logits = output.logits[:, -1]
        if not torch.isfinite(logits).all():
            return None
        next_tokens = logits.argmax(-1)
        for row, token in enumerate(next_tokens.tolist()):
            if done[row]:
                continue
            if token == eos_id:
                done[row] = True
                continue
            generated[row].append(token)
            texts[row], done[row] = _cut_at_stop(tokenizer.decode(generated[row]), stop)
        if all(done) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, 1)], dim=1)
        output = model(
            input_ids=next_tokens.unsqueeze(1),
            attention_mask=attention_mask,
            position_ids=next_positions,
            use_cache=True,
            **{cache_name: getattr(output, cache_name)},
        )
        next_positions = next_positions + 1
    return texts
