"""Tokenise a task once into padded, length-bucketed batches that every candidate then reuses; check before the
model loads that every example tokenises to something to score and fits the model's positions (`check_lengths`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Callable, Sequence, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from evox_merge.tasks import Task
from evox_merge.tasks.chat import check_chat_templates, choice_texts, context_ids, prompt_ids
from evox_merge.tasks.spec import TaskSpec, iter_records
from evox_merge.util.errors import MergeInputError, TaskFormatError

IGNORE = -100
_NOT_PER_ROW = ("predictor",)  # batch fields that are the same for every row
Batch = TypeVar("Batch", "TargetBatch", "PromptBatch", "ChoiceBatch", "PackedChoiceBatch")


@dataclass
class TargetBatch:
    """Right-padded sequences whose scored tokens are marked.

    Attributes:
        input_ids: ``(B, L)`` long.
        attention_mask: ``(B, L)`` long, 1 on real tokens.
        targets: ``(B, L)`` long; ``targets[b, t]`` is the token position ``t`` must predict
            (``input_ids[b, t + 1]``) where it is scored, else ``IGNORE``.
        rows: ``(B,)`` long, the index of each sequence in the task's row order.

    Every tensor lives on the scoring device (``rows`` too: scorers index device tensors with it).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor

    @cached_property
    def scored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions, owners)``: the flat index in ``(B * L)`` of every scored position, in row-major order, and
        the row each belongs to, both ``(n_scored,)`` long on the batch's device. Found once per batch (one
        synchronisation with the device), not once per candidate."""
        flat = (self.targets != IGNORE).flatten().nonzero().flatten()
        return flat, flat // self.targets.shape[1]


@dataclass
class PromptBatch:
    """Left-padded prompts for batched greedy decoding.

    Attributes:
        input_ids: ``(B, L)`` long; attention_mask: ``(B, L)``; position_ids: ``(B, L)`` (0 at each first real
        token); rows: ``(B,)`` indices of the examples.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    rows: torch.Tensor


@dataclass
class ChoiceBatch:
    """Multiple-choice examples whose prompt is run once and whose choices then continue it from the KV cache.

    Attributes:
        prompt_ids: ``(B, Lp)`` long, left-padded prompts; prompt_mask: ``(B, Lp)``; prompt_positions: ``(B, Lp)``
            (0 at each first real token).
        choice_ids: ``(B, C, La)`` long, each choice's tokens, right-padded (C is the most choices of any example).
        choice_mask: ``(B, C, La)`` long, 1 on real choice tokens (all 0 for an example's missing choices).
        rows: ``(B,)`` long, the index of each example in the task's order.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_positions: torch.Tensor
    choice_ids: torch.Tensor
    choice_mask: torch.Tensor
    rows: torch.Tensor


def encode(tokenizer: PreTrainedTokenizerBase, text: str, *, special: bool) -> list[int]:
    """Token ids of `text`; `special` adds the tokenizer's BOS-like special tokens."""
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def is_encoder_decoder(model_config: dict) -> bool:
    """Whether a model's config.json describes an encoder-decoder model (the T5 family scored by
    `evox_merge.tasks.seq2seq`): ``is_encoder_decoder`` set, or T5's relative position buckets."""
    return bool(model_config.get("is_encoder_decoder")) or "relative_attention_num_buckets" in model_config


def position_limit(model_config: dict) -> tuple[int, str] | None:
    """The most token positions a decoder-only model reads, and the config.json key that says so
    (``max_position_embeddings`` or ``n_positions``); None for encoder-decoder models (the T5 family scored here
    uses relative positions, without a maximum) and for a config that gives none."""
    if is_encoder_decoder(model_config):
        return None
    for key in ("max_position_embeddings", "n_positions"):
        value = model_config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def check_lengths(specs: Sequence[TaskSpec], tokenizer: PreTrainedTokenizerBase, model_config: dict,
                  model: str) -> None:
    """Every example of each spec's ``path``, tokenised as the scorers tokenise it, must give them something to
    score and fit the model's positions. Reads the tokenizer only, so it runs before the weights load.

    Something to score: a prompt (generation, multiple choice) of at least one token and every choice of at least
    one; a language-modelling text of at least one token after the spec's ``prefix``, or of at least two without
    one on a decoder-only model (its first token is the context the others are scored after). An encoder-decoder
    model scores every token of a text, its encoder reading the prefix (or the end-of-sequence token alone).
    Fitting (decoder-only models): a generation prompt plus ``max_new_tokens``, a multiple-choice prompt plus its
    longest choice, a language-modelling text after the prefix.

    Args:
        model_config: the model's config.json; an encoder-decoder model (`is_encoder_decoder`) has no position
            limit here.
        model: how messages name the model's config.json (e.g. the base folder).

    Raises:
        TaskFormatError: an example with nothing to score, naming the task, the file and line, the part and what
            was expected; an encoder-decoder language-modelling task whose encoder input tokenises to nothing.
        MergeInputError: an example longer than the model's positions, naming the task file and line, the token
            count and the limit.
    """
    found = position_limit(model_config)
    seq2seq = is_encoder_decoder(model_config)
    check_chat_templates(specs, tokenizer, model, seq2seq)
    for spec in specs:
        if seq2seq and spec.type == "language_modeling":
            _check_encoder_input(spec, tokenizer)
        examples = list(iter_records(spec))
        counts = _token_counts(spec, [record for _, record in examples], tokenizer, seq2seq)
        for (where, record), (context, scored) in zip(examples, counts):
            problem = _nothing_to_score(spec, record, context, scored, seq2seq)
            if problem is not None:
                raise TaskFormatError(f"task {spec.name!r}: {where}: {problem}")
            if found is None:
                continue
            limit, key = found
            size, parts = _length(spec, context, scored)
            if size > limit:
                raise MergeInputError(
                    f"task {spec.name!r}: {where}: {parts} = {size} tokens, more than the {limit} positions of the "
                    f"model ({model}/config.json {key}); shorten the example"
                    + (" or lower max_new_tokens" if spec.type == "generation" else ""))


def _check_encoder_input(spec: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> None:
    """An encoder-decoder language-modelling task's encoder reads its prefix, or the EOS token where that
    tokenises to nothing (`evox_merge.tasks.seq2seq.Seq2SeqLanguageModelScorer`): one of them must exist."""
    if not encode(tokenizer, spec.prefix or "", special=True) and tokenizer.eos_token_id is None:
        raise TaskFormatError(f"task {spec.name!r}: the encoder input (the spec's prefix {spec.prefix!r}) tokenises "
                              "to nothing and the tokenizer has no end-of-sequence token to stand for it; expected a "
                              "prefix of at least one token")


def _token_counts(spec: TaskSpec, records: list[dict], tokenizer: PreTrainedTokenizerBase,
                  seq2seq: bool) -> list[tuple[int, list[int]]]:
    """Per record, as the scorers tokenise it: the tokens of its context (the prompt; a language-modelling task's
    ``prefix``, 0 without one) and of each scored part (each choice; the text; none for a generation prompt)."""
    if not records:
        return []
    if spec.type == "language_modeling":
        prefix = len(context_ids(spec, tokenizer))
        # A decoder-only model's text gets BOS where no prefix precedes it; an encoder-decoder's never does.
        texts = tokenizer([r["text"] for r in records], add_special_tokens=not (prefix or seq2seq))["input_ids"]
        return [(prefix, [len(ids)]) for ids in texts]
    prompts = [len(ids) for ids in prompt_ids(spec, tokenizer, records)]
    if spec.type == "generation":
        return [(p, []) for p in prompts]
    choices = [c for r in records for c in choice_texts(spec, tokenizer, r)]
    lengths = iter(len(ids) for ids in tokenizer(choices, add_special_tokens=False)["input_ids"])
    return [(p, [next(lengths) for _ in r["choices"]]) for p, r in zip(prompts, records)]


def _nothing_to_score(spec: TaskSpec, record: dict, context: int, scored: list[int], seq2seq: bool) -> str | None:
    """What an example lacks for its scorer to score anything (in words, with what was expected), or None."""
    if spec.type == "language_modeling":
        (text,) = scored
        if seq2seq or context:
            after = " after the prefix" if context and not seq2seq else ""
            return None if text else f"the text tokenises to nothing{after}; expected at least one token to score"
        return None if text >= 2 else (
            f"the text tokenises to {_tokens(text)}; a language-modelling text needs at least 2 (the first is the "
            "context the others are scored after) unless the task's 'prefix' gives the context")
    if not context:
        before = "it generates" if spec.type == "generation" else "the choices are scored"
        return (f"the prompt {_shown(record['prompt'])} tokenises to nothing; expected at least one token for the "
                f"model to read before {before}")
    for index, size in enumerate(scored):
        if not size:
            return (f"choices[{index}] {_shown(record['choices'][index])} tokenises to nothing; expected at least "
                    "one token to score")
    return None


def _length(spec: TaskSpec, context: int, scored: list[int]) -> tuple[int, str]:
    """The tokens the scorer puts in one sequence for an example, and how they add up (in words)."""
    if spec.type == "language_modeling":
        shown = f"prefix ({_tokens(context)}) + " if context else ""
        return context + scored[0], f"{shown}text ({_tokens(scored[0])})"
    if spec.type == "generation":
        return (context + spec.max_new_tokens,
                f"prompt ({_tokens(context)}) + max_new_tokens ({spec.max_new_tokens})")
    longest = max(scored)
    return context + longest, f"prompt ({_tokens(context)}) + its longest choice ({_tokens(longest)})"


def _tokens(count: int) -> str:
    return f"{count} token" + "s" * (count != 1)


def _shown(text: str, most: int = 60) -> str:
    """`text` quoted as Python writes it (invisible characters escaped), cut after `most` characters."""
    return repr(text) if len(text) <= most else repr(text[:most]) + "..."


def scored_sequences(task: Task, tokenizer: PreTrainedTokenizerBase) -> list[tuple[list[int], int]]:
    """Per scored row: the token ids and how many leading tokens are context (not scored).

    Multiple choice: one row per (example, choice), context = the prompt, scored = the choice.
    Language modelling: one row per text, every token after the first scored (after the spec's ``prefix``, where
    one is set).
    """
    rows = []
    if task.spec.type == "language_modeling":
        # A spec's prefix is context: tokenised on its own (with BOS; templated with chat_template) and followed by
        # the text's tokens (`evox_merge.tasks.chat.context_ids`).
        prefix = context_ids(task.spec, tokenizer)
        for record in task.records:
            ids = prefix + encode(tokenizer, record["text"], special=not prefix)
            rows.append((ids, max(len(prefix), 1)))
        return rows
    for record, context in zip(task.records, prompt_ids(task.spec, tokenizer, task.records)):
        for choice in choice_texts(task.spec, tokenizer, record):
            rows.append((context + encode(tokenizer, choice, special=False), len(context)))
    return rows


def cut_sorted(order: Sequence[int], per_batch: int, batch_tokens: int | None,
               sizes: Callable[[int], tuple[int, ...]],
               tokens: Callable[[int, tuple[int, ...]], int]) -> list[list[int]]:
    """Cut `order` (items sorted by length) into consecutive chunks: of at most `per_batch` items, or, with
    `batch_tokens`, of as many items as keep the padded batch within `batch_tokens` tokens (an item that alone
    exceeds it gets a batch of its own). ``sizes(item)`` are an item's lengths (e.g. prompt, choice) and
    ``tokens(items, longest)`` the padded tokens of a batch of `items` items whose longest lengths are `longest`.
    """
    if batch_tokens is None:
        return [list(order[start : start + per_batch]) for start in range(0, len(order), per_batch)]
    chunks: list[list[int]] = []
    chunk: list[int] = []
    longest: tuple[int, ...] = ()
    for item in order:
        size = sizes(item)
        grown = tuple(map(max, longest, size)) if chunk else size
        if chunk and tokens(len(chunk) + 1, grown) > batch_tokens:
            chunks.append(chunk)
            chunk, grown = [], size
        chunk.append(item)
        longest = grown
    if chunk:
        chunks.append(chunk)
    return chunks


def target_batches(
    sequences: Sequence[tuple[list[int], int]], pad_id: int, batch_size: int, device: torch.device | str,
    batch_tokens: int | None = None,
) -> list[TargetBatch]:
    """Sort rows by length and cut them into right-padded batches of at most `batch_size` rows (with
    `batch_tokens`: of at most that many tokens, rows x padded length, instead)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]), reverse=True)
    batches = []
    for chunk in cut_sorted(order, batch_size, batch_tokens, lambda i: (len(sequences[i][0]),),
                            lambda rows, longest: rows * longest[0]):
        length = len(sequences[chunk[0]][0])
        input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
        targets = torch.full((len(chunk), length), IGNORE, dtype=torch.long)
        for b, row in enumerate(chunk):
            ids, context = sequences[row]
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
            targets[b, context - 1 : len(ids) - 1] = torch.tensor(ids[context:])
        batches.append(TargetBatch(input_ids.to(device), attention_mask.to(device), targets.to(device),
                                   torch.tensor(chunk, device=device)))
    return batches


def prompt_batches(
    prompts: Sequence[list[int]], pad_id: int, batch_size: int, device: torch.device | str, offset: int = 0,
    batch_tokens: int | None = None, new_tokens: int = 0,
) -> list[PromptBatch]:
    """Sort prompts by length and cut them into left-padded batches, whatever the tokenizer's padding side, of at
    most `batch_size` prompts (with `batch_tokens`: of at most that many tokens, prompts x (padded length +
    `new_tokens`, the tokens decoding adds), instead). Positions start at `offset` (the length of a shared prefix
    the prompts continue, see `tasks.prefix`)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    batches = []
    for chunk in cut_sorted(order, batch_size, batch_tokens, lambda i: (len(prompts[i]),),
                            lambda rows, longest: rows * (longest[0] + new_tokens)):
        length = len(prompts[chunk[0]])
        input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for b, row in enumerate(chunk):
            ids = prompts[row]
            input_ids[b, length - len(ids) :] = torch.tensor(ids)
            attention_mask[b, length - len(ids) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0) + offset
        batches.append(PromptBatch(input_ids.to(device), attention_mask.to(device), position_ids.to(device),
                                   torch.tensor(chunk, device=device)))
    return batches


def choice_batches(
    examples: Sequence[tuple[list[int], list[list[int]]]], pad_id: int, batch_size: int, device: torch.device | str,
    offset: int = 0, batch_tokens: int | None = None,
) -> list[ChoiceBatch]:
    """Cut ``(prompt ids, [choice ids, ...])`` examples, sorted by length, into batches of at most `batch_size`
    scored sequences (examples x choices; with `batch_tokens`: of at most that many tokens, examples x (padded
    prompt + choices x padded choice), instead), prompts left-padded and choices right-padded; prompt positions
    start at `offset` (the length of a shared prefix the prompts continue)."""
    def size(i: int) -> tuple[int, int]:
        prompt, choices = examples[i]
        return len(prompt), max(len(choice) for choice in choices)

    order = sorted(range(len(examples)), key=size, reverse=True)
    most_choices = max(len(choices) for _, choices in examples)
    per_batch = max(1, batch_size // most_choices)
    batches = []
    for chunk in cut_sorted(order, per_batch, batch_tokens, size,
                            lambda rows, longest: rows * (longest[0] + most_choices * longest[1])):
        prompt_length = max(size(i)[0] for i in chunk)
        choice_length = max(size(i)[1] for i in chunk)
        prompt_ids = torch.full((len(chunk), prompt_length), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(chunk), prompt_length), dtype=torch.long)
        choice_ids = torch.full((len(chunk), most_choices, choice_length), pad_id, dtype=torch.long)
        choice_mask = torch.zeros((len(chunk), most_choices, choice_length), dtype=torch.long)
        for b, row in enumerate(chunk):
            prompt, choices = examples[row]
            prompt_ids[b, prompt_length - len(prompt) :] = torch.tensor(prompt)
            prompt_mask[b, prompt_length - len(prompt) :] = 1
            for c, choice in enumerate(choices):
                choice_ids[b, c, : len(choice)] = torch.tensor(choice)
                choice_mask[b, c, : len(choice)] = 1
        prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0) + offset
        tensors = (prompt_ids, prompt_mask, prompt_positions, choice_ids, choice_mask)
        batches.append(ChoiceBatch(*(t.to(device) for t in tensors), torch.tensor(chunk, device=device)))
    return batches


@dataclass
class PackedChoiceBatch:
    """Multiple-choice examples that continue a shared prefix, one row per example: the prompt's own tokens
    (left-padded), then each choice in a slot of ``La`` tokens (right-padded), every choice attending only to the
    prefix, its prompt and itself. The prefix's KV cache is then expanded over examples, not examples x choices.

    Attributes:
        input_ids: ``(B, Q)`` long, ``Q = Lp + C * La``; positions: ``(B, Q)`` (a choice's tokens continue its
            prompt's positions, every choice from the same position).
        visible: ``(B, Q, Q)`` bool, which of the row's own tokens each of its tokens attends to (the prefix is
            visible to all).
        predictor: ``(C * La,)`` long, the index in ``Q`` whose logits predict each choice token (the prompt's
            last token for a choice's first token, else the choice's previous token).
        choice_ids, choice_mask: ``(B, C, La)`` as in `ChoiceBatch`; rows: ``(B,)``.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    visible: torch.Tensor
    predictor: torch.Tensor
    choice_ids: torch.Tensor
    choice_mask: torch.Tensor
    rows: torch.Tensor


def packed_choice_batch(batch: ChoiceBatch) -> PackedChoiceBatch:
    """The examples of a `ChoiceBatch` (whose positions already continue a shared prefix) packed one per row."""
    rows, choices, length = batch.choice_ids.shape
    prompt_length = batch.prompt_ids.shape[1]
    device = batch.prompt_ids.device
    steps = torch.arange(length, device=device)
    positions = torch.cat([batch.prompt_positions, (batch.prompt_positions[:, -1:] + 1 + steps).repeat(1, choices)], 1)
    slot = torch.cat([torch.full((prompt_length,), -1, device=device),
                      torch.arange(choices, device=device).repeat_interleave(length)])
    index = torch.arange(slot.numel(), device=device)
    causal = index.unsqueeze(1) >= index
    same_slot = (slot.unsqueeze(1) == slot) & (slot.unsqueeze(1) >= 0)
    real_prompt = torch.cat([batch.prompt_mask.bool(), torch.zeros(rows, choices * length, dtype=torch.bool,
                                                                    device=device)], dim=1)
    visible = (real_prompt.unsqueeze(1) | same_slot) & causal
    predictor = prompt_length + torch.arange(choices * length, device=device) - 1
    predictor[::length] = prompt_length - 1
    return PackedChoiceBatch(torch.cat([batch.prompt_ids, batch.choice_ids.flatten(1)], dim=1), positions, visible,
                             predictor, batch.choice_ids, batch.choice_mask, batch.rows)


def tile_batch(batch: Batch, copies: int) -> Batch:
    """The batch repeated `copies` times along its rows, copy-major (rows ``p * B ... p * B + B - 1`` are copy
    ``p``), for scoring several candidates in one forward pass; ``rows`` stays the original ``(B,)``."""
    if copies == 1:
        return batch
    tiled = {f.name: getattr(batch, f.name) for f in fields(batch)}
    for name, tensor in tiled.items():
        if name != "rows" and name not in _NOT_PER_ROW:
            tiled[name] = tensor.repeat(copies, *[1] * (tensor.ndim - 1))
    return type(batch)(**tiled)


def split_batch(batch: Batch) -> tuple[Batch, Batch]:
    """The two halves of a batch by rows (for retrying a batch that ran out of memory)."""
    half = (batch.rows.numel() + 1) // 2
    parts = {f.name: getattr(batch, f.name) for f in fields(batch)}
    shared = {name: parts.pop(name) for name in _NOT_PER_ROW if name in parts}
    return (type(batch)(**{name: t[:half] for name, t in parts.items()}, **shared),
            type(batch)(**{name: t[half:] for name, t in parts.items()}, **shared))
