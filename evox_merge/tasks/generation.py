"""Batched greedy decoding with a KV cache, stop checks on token ids (or strings) and early exit."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evox_merge.tasks.batching import PromptBatch
from evox_merge.tasks.prefix import PrefixState, cache_argument


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    cut = min((index for index in (text.find(s) for s in stop if s) if index >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> torch.Tensor | None:
    """The ids of every token whose text holds a stop string, when a decoded completion holds a stop string
    exactly when it holds one of these tokens; None when that cannot be promised (stop checks stay on strings).

    Promised when every stop string is a single ASCII character other than a space: an ASCII character is never
    split across tokens (byte-level BPE and byte fallback keep a byte whole) and decoding never makes or removes
    one at a token boundary (only spaces are added, stripped or cleaned up there). Longer stop strings can be
    spelt by several tokens in many ways, so they keep the string check.
    """
    if not stop or not all(len(s) == 1 and s.isascii() and s != " " for s in stop):
        return None
    texts = tokenizer.batch_decode([[index] for index in range(len(tokenizer))])
    return torch.tensor([index for index, text in enumerate(texts) if any(s in text for s in stop)], dtype=torch.long)


@torch.no_grad()
def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: PromptBatch,
    max_new_tokens: int,
    stop: Sequence[str],
    *,
    stop_ids: torch.Tensor | None = None,
    prefix: PrefixState | None = None,
    copies: int = 1,
) -> list[list[str] | None]:
    """Greedy completions of a left-padded prompt batch, each cut at its first stop string or EOS.

    Args:
        stop_ids: from `stop_token_ids`: stop when one of these tokens is generated and decode each row once at
            the end; None: decode every row after every token and look for the stop strings in the text.
        prefix: the shared prefix the prompts continue (their positions and `batch` already start after it).
        copies: the batch holds this many copies of its rows, copy-major (several candidates in one pass, see
            `evox_merge.experts.rows`).

    Returns:
        Per copy, its rows' completions, or None where that copy's model produced non-finite logits. Decoding ends
        as soon as every row has stopped (or every copy has failed).
    """
    eos_id = tokenizer.eos_token_id
    rows, length = batch.input_ids.shape
    per_copy = rows // copies
    cache_name = cache_argument(model)
    before = prefix.length if prefix is not None else 0
    attention_mask = batch.attention_mask.new_ones(rows, before + length + max_new_tokens)  # grown by slicing
    attention_mask[:, before : before + length] = batch.attention_mask
    width = before + length
    cache = {cache_name: prefix.cache(per_copy)} if prefix is not None else {}
    output = model(input_ids=batch.input_ids, attention_mask=attention_mask[:, :width],
                   position_ids=batch.position_ids, use_cache=True, logits_to_keep=1, **cache)
    positions = batch.position_ids[:, -1:] + 1
    tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=batch.input_ids.device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=tokens.device)
    done = torch.zeros(rows, dtype=torch.bool, device=tokens.device)
    finite = torch.ones(copies, dtype=torch.bool, device=tokens.device)
    active = torch.ones(copies, dtype=torch.bool, device=tokens.device)  # copies with a row still decoding
    ends = torch.tensor([] if eos_id is None else [eos_id], dtype=torch.long, device=tokens.device)
    if stop_ids is not None:  # a row ends at EOS (dropped from its tokens at the end) or a stop token
        ends = torch.cat([stop_ids.to(tokens.device), ends])
    for step in range(max_new_tokens):
        logits = output.logits[:, -1]
        if copies == 1:  # while decoding, the one copy is active
            finite &= torch.isfinite(logits).all()
        else:
            finite &= ~active | torch.isfinite(logits).all(-1).view(copies, per_copy).all(-1)
        next_tokens = logits.argmax(-1)
        tokens[:, step] = next_tokens
        ended = torch.isin(next_tokens, ends) & ~done
        if stop_ids is None:
            for row in (~(done | ended)).nonzero().flatten().tolist():
                ended[row] = cut_at_stop(tokenizer.decode(tokens[row, : step + 1].tolist()), stop)[1]
        lengths.masked_fill_(ended, step + 1)
        done |= ended
        active = ~done.view(copies, per_copy).all(-1)
        if step == max_new_tokens - 1 or not bool((active & finite).any()):
            break
        width += 1
        output = model(input_ids=next_tokens.unsqueeze(1), attention_mask=attention_mask[:, :width],
                       position_ids=positions + step, use_cache=True, **{cache_name: getattr(output, cache_name)})
    if eos_id is not None:  # EOS ends a row without being part of its completion
        lengths -= (tokens.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1) == eos_id).long()
    texts = [cut_at_stop(tokenizer.decode(row[:n]), stop)[0] for row, n in zip(tokens.tolist(), lengths.tolist())]
    return [texts[p * per_copy : (p + 1) * per_copy] if ok else None for p, ok in enumerate(finite.tolist())]
