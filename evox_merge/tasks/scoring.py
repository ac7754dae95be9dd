"""Score the model as it currently is on one task: multiple choice, exact-match generation, or LM NLL.

Each scorer tokenises its task once when built; `score(model)` only runs forward passes over the prepared
batches, so it is the part of the per-candidate loop that scales with the validation set.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Callable, TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evox_merge.tasks.batching import (
    choice_batches, encode, packed_choice_batch, prompt_batches, scored_sequences, split_batch,
    target_batches, tile_batch,
)
from evox_merge.util.errors import TaskFormatError
from evox_merge.tasks.chat import choice_texts, prompt_ids
from evox_merge.tasks.generation import decode_completions, greedy_tokens, stop_token_ids
from evox_merge.tasks.logprobs import TokenLogprobs
from evox_merge.tasks.prefix import cache_argument
from evox_merge.tasks.prefix import MIN_SHARED_PREFIX, SharedPrefix
from evox_merge.tasks import Task


logger = logging.getLogger(__name__)
Result = TypeVar("Result")


def _is_out_of_memory(error: Exception) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and ("out of memory" in str(error) or "can't allocate memory" in str(error))


def run_batches(batches: list, run: Callable[..., Result]) -> list[Result]:
    """`run` each batch in turn. A batch that runs out of memory is halved for good (later candidates reuse the
    smaller batches) and retried, with a warning; a single row that does not fit re-raises."""
    results = []
    index = 0
    while index < len(batches):
        try:
            results.append(run(batches[index]))
            index += 1
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not _is_out_of_memory(error) or batches[index].rows.numel() < 2:
                raise
            rows = batches[index].rows.numel()
            split = getattr(batches[index], "split", None)  # a batch type that knows its own halves
            batches[index : index + 1] = split() if split is not None else split_batch(batches[index])
            logger.warning("out of memory on a batch of %d rows: halved to %d and retrying", rows, (rows + 1) // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: strip the ends and collapse inner whitespace (case-sensitive)."""
    return re.sub(r"\s+", " ", text).strip()


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS, else 0 (padding is always masked)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def _check_scored_rows(task: Task, sequences: list[tuple[list[int], int]], example: int | None = None) -> None:
    """Each ``(token ids, context length)`` sequence must hold a context token and a token to score after it:
    `sequences` has one per example of `task` (language modelling), or, with `example`, one per choice of that
    example. A safety net for scorers built directly from Python: `evox_merge.tasks.batching.check_lengths`
    refuses the same examples before the model loads, naming their file and line.

    Raises:
        TaskFormatError: naming the example by its index in ``task.records`` (and the choice).
    """
    for index, (ids, context) in enumerate(sequences):
        if context < 1 or len(ids) <= context:
            which = f"example {index}" if example is None else f"example {example}, choices[{index}]"
            raise TaskFormatError(
                f"task {task.name!r}, {which}: tokenises to {len(ids)} tokens with {context} of context; "
                "a scored sequence needs at least one context token and one scored token"
            )


class LanguageModelScorer:
    """Language modelling: minus the mean per-token NLL of the texts.

    Where the texts share at least `min_shared_prefix` leading tokens, those run once per candidate (their own
    tokens scored from that one pass) and every text continues from their KV cache (`evox_merge.tasks.prefix`).
    """

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device,
                 min_shared_prefix: int | None = MIN_SHARED_PREFIX, batch_tokens: int | None = None) -> None:
        self.task = task
        self.device = torch.device(device)
        sequences = scored_sequences(task, tokenizer)
        _check_scored_rows(task, sequences)
        ids = [row for row, _ in sequences]
        # The prefix's last position predicts a token every row shares; each row keeps two tokens after it.
        self.prefix = SharedPrefix.of(ids, min_shared_prefix, device, keep=2, shared_next=True)
        skip = self.prefix.length if self.prefix is not None else 0
        if self.prefix is not None:
            # Token j (1 <= j <= skip) is predicted by prefix position j - 1; row r scores it when j >= context.
            self._prefix_targets = torch.tensor(ids[0][1 : skip + 1], device=device)
            self._prefix_start = torch.tensor([min(context - 1, skip) for _, context in sequences], device=device)
        sequences = [(row[skip:], max(context - skip, 1)) for row, context in sequences]
        self.batches = target_batches(sequences, pad_token_id(tokenizer), batch_size, device, batch_tokens)
        self._counts = torch.tensor([len(row) - context for row, context in sequences], dtype=torch.float64)
        if self.prefix is not None:
            self._counts += (skip - self._prefix_start).double().cpu()

    @torch.no_grad()
    def row_logprobs(self, model: PreTrainedModel, copies: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Per text, the summed log-probability of its scored tokens ``(copies, texts)`` float64 and how many
        tokens were scored ``(texts,)``, under the model's current weights (`copies`: see `MergeProblem`).

        The sums stay on the scoring device until every batch has run: one transfer per call, no synchronisation
        per batch (each batch's scored positions are found once, `TargetBatch.scored`)."""
        sums = torch.zeros(copies, self._counts.numel(), dtype=torch.float64, device=self.device)
        tokens = TokenLogprobs(model, copies)
        state = self.prefix.run(model, copies, tokens=tokens) if self.prefix is not None else None
        cache_name = cache_argument(model)
        if state is not None:  # (copies, skip)
            picked = tokens.logprobs(state.states, self._prefix_targets.expand(copies, -1)).double()
            tails = torch.cat([picked.flip(-1).cumsum(-1).flip(-1), picked.new_zeros(copies, 1)], dim=1)
            sums += tails[:, self._prefix_start]  # the sum of each row's scored prefix tokens

        def run(batch) -> None:
            tiled = tile_batch(batch, copies)
            mask = tiled.attention_mask if state is None else state.mask(tiled.attention_mask)
            extra = {} if state is None else {cache_name: state.cache(batch.rows.numel())}
            states, _ = tokens.states(input_ids=tiled.input_ids, attention_mask=mask, **extra)
            positions, owners = batch.scored  # of one copy; copy p's rows follow p * B * L positions later
            rows, length = batch.targets.shape
            if copies > 1:
                positions = (positions + torch.arange(copies, device=positions.device).unsqueeze(1) * rows * length)
            positions = positions.flatten()
            picked = tokens.logprobs(states.flatten(0, 1)[positions], tiled.targets.flatten()[positions])
            picked = picked.double().view(copies, -1)  # (copies, n_scored)
            sums[:, batch.rows] += picked.new_zeros(copies, rows).index_add_(1, owners, picked)

        run_batches(self.batches, run)
        return sums.cpu(), self._counts

    def example_parts(self, model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
        """Per text, ``(numerator, denominator)`` float64 of the task score: its summed log-probability and how
        many tokens it scored (the score is ``sum(numerators) / sum(denominators)``; used by racing)."""
        sums, counts = self.row_logprobs(model)
        return sums[0], counts

    def scores(self, model: PreTrainedModel, copies: int = 1) -> list[float]:
        """Per copy: minus the mean NLL per scored token; NaN if any is not finite."""
        sums, counts = self.row_logprobs(model, copies)
        totals = sums.sum(-1)
        return [total / counts.sum().item() if math.isfinite(total) else math.nan for total in totals.tolist()]

    def score(self, model: PreTrainedModel) -> float:
        """Minus the mean NLL per scored token of the model's current weights; NaN if any is not finite."""
        return self.scores(model)[0]


class ChoiceAnswers:
    """What every multiple-choice scorer shares (decoder-only here, encoder-decoder in `evox_merge.tasks.seq2seq`):
    the answers, which entries are real choices, each choice's length in characters (``accuracy_norm``) and the
    per-example parts of the accuracy from ``choice_logprobs(model)``."""

    def _prepare_answers(self, task: Task) -> None:
        self._answers = torch.tensor([record["answer"] for record in task.records])
        choices = torch.tensor([len(record["choices"]) for record in task.records])
        most = int(choices.max())
        self.real_choices = torch.arange(most) < choices.unsqueeze(1)
        self._choice_chars = torch.ones(len(task.records), most, dtype=torch.float64)
        for index, record in enumerate(task.records):
            self._choice_chars[index, : len(record["choices"])] = torch.tensor(
                [float(len(choice)) for choice in record["choices"]], dtype=torch.float64
            )

    def example_parts(self, model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example, ``(1.0 if its answer won else 0.0, 1.0)`` float64 (NaN numerators if any choice's
        log-probability is not finite); the accuracy is ``sum(numerators) / sum(denominators)``."""
        logprobs = self.choice_logprobs(model)
        ones = torch.ones(len(self._answers), dtype=torch.float64)
        if not torch.isfinite(logprobs[self.real_choices]).all():
            return ones * math.nan, ones
        if self.task.spec.metric == "accuracy_norm":
            logprobs = logprobs / self._choice_chars
        return (logprobs.argmax(-1) == self._answers).double(), ones


class MultipleChoiceScorer(ChoiceAnswers):
    """Multiple choice by summed log-likelihood of each choice after the prompt (``accuracy``), or that sum
    divided by the choice's length in characters (``accuracy_norm``).

    Each prompt runs through the model once; its KV cache is then repeated for the example's choices, which are
    scored in one more forward pass (about half the tokens of scoring every prompt + choice sequence in full).
    Where the prompts share at least `min_shared_prefix` leading tokens, those run once per candidate and every
    prompt continues from their KV cache (`evox_merge.tasks.prefix`).

    Attributes:
        real_choices: ``(examples, most choices)`` bool, which entries of `choice_logprobs` are real choices.
    """

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device,
                 min_shared_prefix: int | None = MIN_SHARED_PREFIX, batch_tokens: int | None = None) -> None:
        self.task = task
        self.device = torch.device(device)
        examples = []
        prompts = prompt_ids(task.spec, tokenizer, task.records)
        for index, (record, prompt) in enumerate(zip(task.records, prompts)):
            choices = [encode(tokenizer, choice, special=False)
                       for choice in choice_texts(task.spec, tokenizer, record)]
            _check_scored_rows(task, [(prompt + choice, len(prompt)) for choice in choices], index)
            examples.append((prompt, choices))
        self.prefix = SharedPrefix.of([prompt for prompt, _ in examples], min_shared_prefix, device)
        skip = self.prefix.length if self.prefix is not None else 0
        examples = [(prompt[skip:], choices) for prompt, choices in examples]
        self.batches = choice_batches(examples, pad_token_id(tokenizer), batch_size, device, offset=skip,
                                      batch_tokens=batch_tokens)
        if self.prefix is not None:  # after a shared prefix, one row per example (see PackedChoiceBatch)
            self.batches = [packed_choice_batch(batch) for batch in self.batches]
        self._prepare_answers(task)

    @torch.no_grad()
    def choice_logprobs(self, model: PreTrainedModel, copies: int | None = None) -> torch.Tensor:
        """``(examples, most choices)`` float64: each choice's summed log-probability given its prompt under the
        model's current weights (-inf where an example has fewer choices); ``(copies, examples, most choices)``
        when `copies` is given (see `MergeProblem`'s ``candidates_per_pass``). They stay on the scoring device
        until every batch has run (one transfer per call)."""
        logprobs = torch.empty((copies or 1, *self._choice_chars.shape), dtype=torch.float64, device=self.device)
        cache_name = cache_argument(model)
        tokens = TokenLogprobs(model, copies or 1)
        state = self.prefix.run(model, copies or 1) if self.prefix is not None else None

        def run(batch) -> None:
            tiled = tile_batch(batch, copies or 1)
            rows, choices, length = tiled.choice_ids.shape
            last, prompt = tokens.states(1, input_ids=tiled.prompt_ids, attention_mask=tiled.prompt_mask,
                                         position_ids=tiled.prompt_positions, use_cache=True)
            cache = getattr(prompt, cache_name)
            cache.batch_repeat_interleave(choices)
            choice_ids = tiled.choice_ids.reshape(rows * choices, length)
            choice_mask = tiled.choice_mask.reshape(rows * choices, length)
            start = tiled.prompt_positions[:, -1:].repeat_interleave(choices, dim=0) + 1
            continued, _ = tokens.states(
                length - 1,
                input_ids=choice_ids[:, :-1],
                attention_mask=torch.cat([tiled.prompt_mask.repeat_interleave(choices, dim=0), choice_mask[:, :-1]],
                                         dim=1),
                position_ids=start + torch.arange(length - 1, device=start.device),
                use_cache=True,
                **{cache_name: cache},
            ) if length > 1 else (last.new_zeros(rows * choices, 0, last.shape[-1]), None)
            # Token 0 of a choice is predicted by the prompt's last position, token j by the choice's position j-1.
            states = torch.cat([last.repeat_interleave(choices, dim=0), continued], 1)
            store(batch, states.view(rows, choices * length, -1), tiled.choice_ids, tiled.choice_mask)

        def run_packed(batch) -> None:
            tiled = tile_batch(batch, copies or 1)
            dtype = state.keys_values[0][0].dtype
            visible = torch.cat([tiled.visible.new_ones(*tiled.visible.shape[:2], state.length), tiled.visible], 2)
            mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
                ~visible, torch.finfo(dtype).min)
            states, _ = tokens.states(tiled.predictor, input_ids=tiled.input_ids, attention_mask=mask.unsqueeze(1),
                                      position_ids=tiled.positions, use_cache=True,
                                      **{cache_name: state.cache(batch.rows.numel())})
            store(batch, states, tiled.choice_ids, tiled.choice_mask)

        def store(batch, states: torch.Tensor, choice_ids: torch.Tensor, choice_mask: torch.Tensor) -> None:
            """Sum each choice's token log-probabilities; ``states (rows, C * La, ...)`` predict its tokens."""
            rows, choices, length = choice_ids.shape
            picked = tokens.logprobs(states, choice_ids.view(rows, -1))
            summed = torch.where(choice_mask.view(rows, -1).bool(), picked, 0.0).view(rows, choices, length)
            logprobs[:, batch.rows] = summed.double().sum(-1).view(copies or 1, -1, choices)

        run_batches(self.batches, run if state is None else run_packed)
        logprobs = logprobs.cpu().masked_fill(~self.real_choices, -math.inf)
        return logprobs if copies is not None else logprobs[0]

    def scores(self, model: PreTrainedModel, copies: int = 1) -> list[float]:
        """Per copy: the task's accuracy; NaN if any choice's log-probability is not finite."""
        results = []
        for logprobs in self.choice_logprobs(model, copies):
            if not torch.isfinite(logprobs[self.real_choices]).all():
                results.append(math.nan)
                continue
            if self.task.spec.metric == "accuracy_norm":
                logprobs = logprobs / self._choice_chars
            results.append((logprobs.argmax(-1) == self._answers).double().mean().item())
        return results

    def score(self, model: PreTrainedModel) -> float:
        """The task's accuracy for the model's current weights; NaN if any choice's log-probability is not
        finite."""
        return self.scores(model)[0]


class CompletionAnswers:
    """What every generation scorer shares (decoder-only here, encoder-decoder in `evox_merge.tasks.seq2seq`): the
    per-example parts of exact-match accuracy from ``completions(model)`` against ``answers``."""

    def example_parts(self, model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example, ``(1.0 if its completion matches else 0.0, 1.0)`` float64 (NaN numerators if decoding
        met non-finite logits); the accuracy is ``sum(numerators) / sum(denominators)``."""
        texts = self.completions(model)
        ones = torch.ones(len(self.answers), dtype=torch.float64)
        if texts is None:
            return ones * math.nan, ones
        return torch.tensor([float(normalize_answer(t) == a) for t, a in zip(texts, self.answers)],
                            dtype=torch.float64), ones


class GenerationScorer(CompletionAnswers):
    """Greedy, batched decoding scored by exact match after `normalize_answer`.

    Stop strings that are single ASCII characters are checked on token ids (`stop_token_ids`); prompts that
    share at least `min_shared_prefix` leading tokens continue that prefix's KV cache (`evox_merge.tasks.prefix`).
    """

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device,
                 min_shared_prefix: int | None = MIN_SHARED_PREFIX, batch_tokens: int | None = None) -> None:
        self.task = task
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        prompts = prompt_ids(task.spec, tokenizer, task.records)
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise TaskFormatError(f"task {task.name!r}, example {index}: the prompt tokenises to nothing; a "
                                      "prompt needs at least one token for the model to continue")
        self.prefix = SharedPrefix.of(prompts, min_shared_prefix, device)
        skip = self.prefix.length if self.prefix is not None else 0
        self.batches = prompt_batches([p[skip:] for p in prompts], pad_token_id(tokenizer), batch_size, device, skip,
                                      batch_tokens=batch_tokens, new_tokens=task.spec.max_new_tokens)
        self.answers = [normalize_answer(record["answer"]) for record in task.records]
        self.stop_ids = stop_token_ids(tokenizer, task.spec.stop)
        if self.stop_ids is not None:
            self.stop_ids = self.stop_ids.to(device)  # once, not per batch

    def completions(self, model: PreTrainedModel, copies: int | None = None) -> list[str] | None:
        """Each example's completion, cut at the first stop string; None if the logits were not finite. With
        `copies`, a list of that per copy (see `MergeProblem`'s ``candidates_per_pass``).

        Every batch's tokens stay on the scoring device; they come to the host once, after the last batch, and are
        decoded then (`decode_completions`)."""
        spec, count = self.task.spec, copies or 1
        tokens = torch.zeros(count, len(self.answers), spec.max_new_tokens, dtype=torch.long, device=self.device)
        lengths = torch.zeros(count, len(self.answers), dtype=torch.long, device=self.device)
        finite = torch.ones(count, dtype=torch.bool, device=self.device)
        state = self.prefix.run(model, count) if self.prefix is not None else None

        def run(batch) -> None:
            generated = greedy_tokens(model, self.tokenizer, tile_batch(batch, count), spec.max_new_tokens, spec.stop,
                                      stop_ids=self.stop_ids, prefix=state, copies=count)
            tokens[:, batch.rows] = generated.tokens.view(count, -1, spec.max_new_tokens)
            lengths[:, batch.rows] = generated.lengths.view(count, -1)
            finite.logical_and_(generated.finite)

        run_batches(self.batches, run)
        texts = decode_completions(self.tokenizer, tokens, lengths, finite, spec.stop)
        return texts if copies is not None else texts[0]

    def scores(self, model: PreTrainedModel, copies: int = 1) -> list[float]:
        """Per copy: exact-match accuracy; NaN if decoding met non-finite logits."""
        return [
            math.nan if texts is None
            else sum(normalize_answer(text) == answer for text, answer in zip(texts, self.answers)) / len(self.answers)
            for texts in self.completions(model, copies)
        ]

    def score(self, model: PreTrainedModel) -> float:
        """Exact-match accuracy of the model's current weights; NaN if decoding met non-finite logits."""
        return self.scores(model)[0]
