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

from evox_merge.batching import IGNORE, encode, prompt_batches, scored_sequences, split_batch, target_batches
from evox_merge.errors import TaskFormatError
from evox_merge.generation import greedy_completions
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


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


class LogLikelihoodScorer:
    """Multiple choice (accuracy, or accuracy_norm: log-likelihood divided by the choice's length in characters)
    and language modelling (minus the mean per-token NLL)."""

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device) -> None:
        self.task = task
        sequences = scored_sequences(task, tokenizer)
        for index, (ids, context) in enumerate(sequences):
            if context < 1 or len(ids) <= context:
                raise TaskFormatError(
                    f"task {task.name!r}, row {index}: tokenises to {len(ids)} tokens with {context} of context; "
                    "a scored row needs at least one context token and one scored token"
                )
        self.batches = target_batches(sequences, _pad_id(tokenizer), batch_size, device)
        self.num_rows = len(sequences)
        if task.spec.type == "multiple_choice":
            self._choices = [len(record["choices"]) for record in task.records]
            self._answers = torch.tensor([record["answer"] for record in task.records])
            self._choice_chars = torch.tensor(
                [len(choice) for record in task.records for choice in record["choices"]], dtype=torch.float64
            )

    @torch.no_grad()
    def score(self, model: PreTrainedModel) -> float:
        """The task's metric for the model's current weights; NaN if any scored log-probability is not finite."""
        logprob_sum = torch.empty(self.num_rows, dtype=torch.float64)
        token_count = torch.empty(self.num_rows, dtype=torch.float64)

        def run(batch) -> None:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            scored = batch.targets != IGNORE
            row_logprobs = torch.zeros(scored.shape, dtype=torch.float32, device=logits.device)
            picked = torch.log_softmax(logits[scored].float(), dim=-1)  # (n_scored, V)
            row_logprobs[scored] = picked.gather(-1, batch.targets[scored].unsqueeze(-1)).squeeze(-1)
            logprob_sum[batch.rows] = row_logprobs.sum(-1).double().cpu()
            token_count[batch.rows] = scored.sum(-1).double().cpu()

        run_batches(self.batches, run)
        if not torch.isfinite(logprob_sum).all():
            return math.nan
        if self.task.spec.type == "language_modeling":
            return (logprob_sum.sum() / token_count.sum()).item()
        if self.task.spec.metric == "accuracy_norm":
            logprob_sum = logprob_sum / self._choice_chars
        correct = [
            int(torch.argmax(scores).item() == answer)
            for scores, answer in zip(logprob_sum.split(self._choices), self._answers.tolist())
        ]
        return sum(correct) / len(correct)


class GenerationScorer:
    """Greedy, batched decoding scored by exact match after `normalize_answer`."""

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device) -> None:
        self.task = task
        self.tokenizer = tokenizer
        prompts = [encode(tokenizer, record["prompt"], special=True) for record in task.records]
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise TaskFormatError(f"task {task.name!r}, example {index}: the prompt tokenises to nothing")
        self.batches = prompt_batches(prompts, _pad_id(tokenizer), batch_size, device)
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
    return LogLikelihoodScorer(task, tokenizer, batch_size, device)
