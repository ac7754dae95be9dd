"""Batched greedy decoding with a KV cache, stop checks on token ids (or strings) and early exit."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class GreedyTokens:
    """What greedy decoding of one batch leaves on the device.

    Attributes:
        tokens: ``(rows, max_new_tokens)`` long, each row's generated tokens (those past its length are not part of
            its completion).
        lengths: ``(rows,)`` long, how many of them the completion keeps (a final EOS excluded).
        finite: ``(copies,)`` bool, whether that copy's logits stayed finite while it decoded.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    finite: torch.Tensor


@torch.no_grad()
def greedy_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: PromptBatch,
    max_new_tokens: int,
    stop: Sequence[str],
    *,
    stop_ids: torch.Tensor | None = None,
    prefix: PrefixState | None = None,
    copies: int = 1,
) -> GreedyTokens:
    """Greedy decoding of a left-padded prompt batch, each row ending at its first stop token or EOS, kept on the
    device (`decode_completions` makes the texts).

    Args:
        stop_ids: from `stop_token_ids` (on the batch's device): a row stops when it generates one of these tokens;
            None: every undecided row is decoded after every token and its text searched for the stop strings (the
            one per-row host work left, needed for stop strings a token id cannot decide).
        prefix: the shared prefix the prompts continue (their positions and `batch` already start after it).
        copies: the batch holds this many copies of its rows, copy-major (several candidates in one pass, see
            `evox_merge.experts.rows`).

    Decoding ends as soon as every row has stopped (or every copy has failed): one host synchronisation per
    generated token for that check, none per row.
    """
    eos_id = tokenizer.eos_token_id
    rows, length = batch.input_ids.shape
    per_copy = rows // copies
    device = batch.input_ids.device
    cache_name = cache_argument(model)
    before = prefix.length if prefix is not None else 0
    attention_mask = batch.attention_mask.new_ones(rows, before + length + max_new_tokens)  # grown by slicing
    attention_mask[:, before : before + length] = batch.attention_mask
    width = before + length
    cache = {cache_name: prefix.cache(per_copy)} if prefix is not None else {}
    output = model(input_ids=batch.input_ids, attention_mask=attention_mask[:, :width],
                   position_ids=batch.position_ids, use_cache=True, logits_to_keep=1, **cache)
    positions = batch.position_ids[:, -1:] + 1
    tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    finite = torch.ones(copies, dtype=torch.bool, device=device)
    active = torch.ones(copies, dtype=torch.bool, device=device)  # copies with a row still decoding
    ends = torch.full((0 if eos_id is None else 1,), -1 if eos_id is None else eos_id, dtype=torch.long,
                      device=device)  # made on the device: no copy from the host per batch
    if stop_ids is not None:  # a row ends at EOS (dropped from its tokens at the end) or a stop token
        ends = torch.cat([stop_ids.to(device), ends])
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
    return GreedyTokens(tokens, lengths, finite)


def decode_completions(tokenizer: PreTrainedTokenizerBase, tokens: torch.Tensor, lengths: torch.Tensor,
                       finite: torch.Tensor, stop: Sequence[str]) -> list[list[str] | None]:
    """Per copy, its rows' completions (each cut at its first stop string), or None where that copy's logits were
    not finite, from ``tokens (copies, rows, T)``, ``lengths (copies, rows)`` and ``finite (copies,)``: one
    transfer to the host for all three, then one batched decode."""
    copies, rows, width = tokens.shape
    host = torch.cat([tokens.flatten(), lengths.flatten(), finite.long()]).tolist()
    ids, counts, ok = host[: copies * rows * width], host[copies * rows * width : -copies], host[-copies:]
    texts = tokenizer.batch_decode([ids[r * width : r * width + n] for r, n in enumerate(counts)])
    texts = [cut_at_stop(text, stop)[0] for text in texts]
    return [texts[p * rows : (p + 1) * rows] if good else None for p, good in enumerate(ok)]


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
    """Greedy completions of a left-padded prompt batch, each cut at its first stop string or EOS
    (`greedy_tokens`, then `decode_completions`).

    Returns:
        Per copy, its rows' completions, or None where that copy's model produced non-finite logits.
    """
    generated = greedy_tokens(model, tokenizer, batch, max_new_tokens, stop, stop_ids=stop_ids, prefix=prefix,
                              copies=copies)
    per_copy = batch.input_ids.shape[0] // copies
    return decode_completions(tokenizer, generated.tokens.view(copies, per_copy, -1),
                              generated.lengths.view(copies, per_copy), generated.finite, stop)
