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
    IGNORE, choice_batches, encode, prompt_batches, scored_sequences, split_batch, target_batches,
)
from evox_merge.util.errors import TaskFormatError
from evox_merge.tasks.generation import cache_argument, greedy_completions
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
            batches[index : index + 1] = split_batch(batches[index])
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


def _check_scored_rows(task: Task, sequences: list[tuple[list[int], int]]) -> None:
    for index, (ids, context) in enumerate(sequences):
        if context < 1 or len(ids) <= context:
            raise TaskFormatError(
                f"task {task.name!r}, row {index}: tokenises to {len(ids)} tokens with {context} of context; "
                "a scored row needs at least one context token and one scored token"
            )


class LanguageModelScorer:
    """Language modelling: minus the mean per-token NLL of the texts."""

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device) -> None:
        self.task = task
        sequences = scored_sequences(task, tokenizer)
        _check_scored_rows(task, sequences)
        self.batches = target_batches(sequences, pad_token_id(tokenizer), batch_size, device)

    @torch.no_grad()
    def score(self, model: PreTrainedModel) -> float:
        """Minus the mean NLL per scored token of the model's current weights; NaN if any is not finite."""

        def run(batch) -> tuple[float, int]:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            scored = batch.targets != IGNORE
            logprobs = torch.log_softmax(logits[scored].float(), dim=-1)  # (n_scored, V)
            picked = logprobs.gather(-1, batch.targets[scored].unsqueeze(-1))
            return picked.double().sum().item(), int(scored.sum())

        sums, counts = zip(*run_batches(self.batches, run))
        total = sum(sums)
        return total / sum(counts) if math.isfinite(total) else math.nan


class MultipleChoiceScorer:
    """Multiple choice by summed log-likelihood of each choice after the prompt (``accuracy``), or that sum
    divided by the choice's length in characters (``accuracy_norm``).

    Each prompt runs through the model once; its KV cache is then repeated for the example's choices, which are
    scored in one more forward pass (about half the tokens of scoring every prompt + choice sequence in full).

    Attributes:
        real_choices: ``(examples, most choices)`` bool, which entries of `choice_logprobs` are real choices.
    """

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device) -> None:
        self.task = task
        examples = []
        for record in task.records:
            prompt = encode(tokenizer, record["prompt"], special=True)
            choices = [encode(tokenizer, choice, special=False) for choice in record["choices"]]
            _check_scored_rows(task, [(prompt + choice, len(prompt)) for choice in choices])
            examples.append((prompt, choices))
        self.batches = choice_batches(examples, pad_token_id(tokenizer), batch_size, device)
        choices = torch.tensor([len(record["choices"]) for record in task.records])
        self._answers = torch.tensor([record["answer"] for record in task.records])
        most = int(choices.max())
        self.real_choices = torch.arange(most) < choices.unsqueeze(1)
        self._choice_chars = torch.ones(len(task.records), most, dtype=torch.float64)
        for index, record in enumerate(task.records):
            self._choice_chars[index, : len(record["choices"])] = torch.tensor(
                [float(len(choice)) for choice in record["choices"]], dtype=torch.float64
            )

    @torch.no_grad()
    def choice_logprobs(self, model: PreTrainedModel) -> torch.Tensor:
        """``(examples, most choices)`` float64: each choice's summed log-probability given its prompt under the
        model's current weights (-inf where an example has fewer choices)."""
        logprobs = torch.empty(self._choice_chars.shape, dtype=torch.float64)
        cache_name = cache_argument(model)

        def run(batch) -> None:
            rows, choices, length = batch.choice_ids.shape
            prompt = model(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                           position_ids=batch.prompt_positions, use_cache=True, logits_to_keep=1)
            cache = getattr(prompt, cache_name)
            cache.batch_repeat_interleave(choices)
            choice_ids = batch.choice_ids.reshape(rows * choices, length)
            choice_mask = batch.choice_mask.reshape(rows * choices, length)
            start = batch.prompt_positions[:, -1:].repeat_interleave(choices, dim=0) + 1
            continued = model(
                input_ids=choice_ids,
                attention_mask=torch.cat([batch.prompt_mask.repeat_interleave(choices, dim=0), choice_mask], dim=1),
                position_ids=start + torch.arange(length, device=start.device),
                use_cache=True,
                **{cache_name: cache},
            )
            # Token 0 of a choice is predicted by the prompt's last position, token j by the choice's position j-1.
            logits = torch.cat([prompt.logits[:, -1:].repeat_interleave(choices, dim=0), continued.logits[:, :-1]], 1)
            picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, choice_ids.unsqueeze(-1)).squeeze(-1)
            summed = torch.where(choice_mask.bool(), picked, 0.0).double().sum(-1)
            logprobs[batch.rows] = summed.cpu().view(rows, choices)

        run_batches(self.batches, run)
        return logprobs.masked_fill(~self.real_choices, -math.inf)

    def score(self, model: PreTrainedModel) -> float:
        """The task's accuracy for the model's current weights; NaN if any choice's log-probability is not
        finite."""
        logprobs = self.choice_logprobs(model)
        if not torch.isfinite(logprobs[self.real_choices]).all():
            return math.nan
        if self.task.spec.metric == "accuracy_norm":
            logprobs = logprobs / self._choice_chars
        return (logprobs.argmax(-1) == self._answers).double().mean().item()


class GenerationScorer:
    """Greedy, batched decoding scored by exact match after `normalize_answer`."""

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device) -> None:
        self.task = task
        self.tokenizer = tokenizer
        prompts = [encode(tokenizer, record["prompt"], special=True) for record in task.records]
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise TaskFormatError(f"task {task.name!r}, example {index}: the prompt tokenises to nothing")
        self.batches = prompt_batches(prompts, pad_token_id(tokenizer), batch_size, device)
        self.answers = [normalize_answer(record["answer"]) for record in task.records]

    def completions(self, model: PreTrainedModel) -> list[str] | None:
        """Each example's completion, cut at the first stop string; None if the logits were not finite."""
        spec = self.task.spec
        texts: list[str] = [""] * len(self.answers)

        def run(batch) -> bool:
            batch_texts = greedy_completions(model, self.tokenizer, batch, spec.max_new_tokens, spec.stop)
            for row, text in zip(batch.rows.tolist(), batch_texts or []):
                texts[row] = text
            return batch_texts is not None

        return texts if all(run_batches(self.batches, run)) else None

    def score(self, model: PreTrainedModel) -> float:
        """Exact-match accuracy of the model's current weights; NaN if decoding met non-finite logits."""
        texts = self.completions(model)
        if texts is None:
            return math.nan
        hits = sum(normalize_answer(text) == answer for text, answer in zip(texts, self.answers))
        return hits / len(self.answers)


def build_scorer(task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device):
    """The scorer for the task's type, with the task tokenised and batched on `device`."""
    if task.spec.type == "generation":
        return GenerationScorer(task, tokenizer, batch_size, device)
    if task.spec.type == "multiple_choice":
        return MultipleChoiceScorer(task, tokenizer, batch_size, device)
    return LanguageModelScorer(task, tokenizer, batch_size, device)
