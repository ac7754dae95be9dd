"""Scoring harness-built tasks (`evox_merge.tasks.lm_eval_tasks`) with the harness's own metrics on our batched
scorers' outputs: each example's per-choice log-likelihoods or completion go through the harness task's filters
and ``process_results`` (the metric per document); a task's score is their mean, as the harness aggregates
``acc``, ``acc_norm`` and ``exact_match``."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evox_merge.tasks import Task
from evox_merge.tasks.lm_eval_tasks import spec_task, split_docs
from evox_merge.tasks.prefix import MIN_SHARED_PREFIX
from evox_merge.tasks.scoring import GenerationScorer, LanguageModelScorer, MultipleChoiceScorer
from evox_merge.util.errors import TaskFormatError


class _HarnessMetric:
    """The harness task, its split's documents and the metric of a harness-built task."""

    def _attach(self, task: Task) -> None:
        self.harness, split = spec_task(task.spec)
        docs = split_docs(self.harness, split)
        self.docs = [docs[record["doc_id"]] for record in task.records]
        self.metric = task.spec.lm_eval["metric"]

    def _mean(self, values: Sequence[float] | None) -> float:
        return math.nan if values is None else sum(values) / len(values)

    def example_parts(self, model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example, ``(the harness metric of its document, 1.0)`` float64 (NaN numerators when the model's
        outputs were not finite); the task's score is their mean."""
        values = self.values(model, 1)[0]
        ones = torch.ones(len(self.docs), dtype=torch.float64)
        return (ones * math.nan, ones) if values is None else (torch.tensor(values, dtype=torch.float64), ones)

    def scores(self, model: PreTrainedModel, copies: int = 1) -> list[float]:
        """Per copy: the mean of the harness metric over the examples; NaN if an output was not finite."""
        return [self._mean(values) for values in self.values(model, copies)]

    def score(self, model: PreTrainedModel) -> float:
        """The harness metric's mean for the model's current weights."""
        return self.scores(model)[0]


class HarnessChoiceScorer(_HarnessMetric, MultipleChoiceScorer):
    """Multiple choice: our per-choice log-likelihoods (`MultipleChoiceScorer`) through the harness task's
    ``process_results`` (``acc``: the argmax; ``acc_norm``: divided by each choice's length in characters)."""

    def __init__(self, task: Task, *args: Any, **kwargs: Any) -> None:
        super().__init__(task, *args, **kwargs)
        self._attach(task)

    def values(self, model: PreTrainedModel, copies: int) -> list[list[float] | None]:
        """Per copy, the metric per example (None where a log-likelihood was not finite)."""
        result = []
        for logprobs in self.choice_logprobs(model, copies):
            if not torch.isfinite(logprobs[self.real_choices]).all():
                result.append(None)
                continue
            rows = logprobs.tolist()
            result.append([float(self.harness.process_results(doc, [(ll, False) for ll in row[:count]])[self.metric])
                           for doc, row, count in zip(self.docs, rows, self.real_choices.sum(-1).tolist())])
        return result


class HarnessGenerationScorer(_HarnessMetric, GenerationScorer):
    """Generation: our greedy completions (`GenerationScorer`) through the harness task's filter pipeline and
    ``process_results`` (``exact_match`` with the task's own options)."""

    def __init__(self, task: Task, *args: Any, **kwargs: Any) -> None:
        super().__init__(task, *args, **kwargs)
        self._attach(task)
        names = {ensemble.name: ensemble for ensemble in self.harness._filters}
        self.filter = names[task.spec.lm_eval["filter"]]

    def values(self, model: PreTrainedModel, copies: int) -> list[list[float] | None]:
        """Per copy, the metric per example (None where decoding met non-finite logits)."""
        from lm_eval.api.instance import Instance

        result = []
        for texts in self.completions(model, copies):
            if texts is None:
                result.append(None)
                continue
            instances = []
            for doc, record, text in zip(self.docs, self.task.records, texts):
                instance = Instance("generate_until", doc, (record["prompt"], {}), 0,
                                    (self.harness.config.task, record["doc_id"], 1))
                instance.resps = [text]
                instances.append(instance)
            self.filter.apply(instances)
            filtered = [inst.filtered_resps[self.filter.name] for inst in instances]
            result.append([float(self.harness.process_results(doc, [resp])[self.metric])
                           for doc, resp in zip(self.docs, filtered)])
        return result


def build_harness_scorer(task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device,
                         min_shared_prefix: int | None = MIN_SHARED_PREFIX, batch_tokens: int | None = None):
    """The scorer of a harness-built task (``task.spec.lm_eval``): language modelling is scored as any (minus the
    mean NLL per token, after the harness's prefix token); choices and generation with the harness's metric."""
    scorer = {"multiple_choice": HarnessChoiceScorer, "generation": HarnessGenerationScorer}.get(
        task.spec.type, LanguageModelScorer)
    return scorer(task, tokenizer, batch_size, device, min_shared_prefix, batch_tokens)


def rolling_metrics(task: Task, logprob_sums: Sequence[float]) -> dict[str, float]:
    """The harness's aggregated metrics of a loglikelihood_rolling task (word and byte perplexity, bits per byte,
    as the task lists them) from each text's summed log-likelihood, e.g. `LanguageModelScorer.row_logprobs`."""
    if task.spec.lm_eval is None or task.spec.type != "language_modeling":
        raise TaskFormatError(f"task {task.name!r}: rolling_metrics needs a harness loglikelihood_rolling task")
    harness, split = spec_task(task.spec)
    docs = split_docs(harness, split)
    per_doc = [harness.process_results(docs[record["doc_id"]], [float(ll)])
               for record, ll in zip(task.records, logprob_sums)]
    aggregations = harness.aggregation()
    return {name: float(aggregations[name]([values[name] for values in per_doc])) for name in per_doc[0]}
