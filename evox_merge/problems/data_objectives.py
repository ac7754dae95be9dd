"""A problem's task data as differentiable objectives: what the data-aware static merges (Fisher merging, RegMean,
AdaMerging: `evox_merge.problems.data_aware`, `evox_merge.problems.adamerging`) compute from the search part.

The scorers (`evox_merge.tasks.scoring`) run without gradients and score accuracy or NLL; these batches hold each
example as rows of ``(context tokens, target tokens)``: a multiple-choice example one row per choice (context the
prompt), a generation example one row (its prompt; its answer then the end-of-sequence token, where greedy decoding
stops: a merge that cannot stop fails exact match), a language-modelling text one row (the spec's prefix or the
first token, then the rest). A decoder-only model reads context + target in one sequence; an encoder-decoder model
reads the context in its encoder and the target teacher-forced in its decoder. Three per-example terms, each a
``(numerator, denominator)`` pair so that a task's value is ``sum(num) / sum(den)`` over its examples, whatever the
batching:

- ``loglik``: the log-likelihood of the example's target (multiple choice: the answer's log-probability under the
  softmax over the choices' summed log-probabilities; generation and language modelling: the target tokens' summed
  log-probability; denominator 1): what the empirical Fisher differentiates (arXiv 2111.09832).
- ``supervised``: minus ``loglik`` per example (multiple choice), per target token (generation, language modelling).
- ``entropy``: AdaMerging's objective on unlabelled inputs (arXiv 2310.02575): the entropy of the choice
  distribution (multiple choice), of the next-token distribution where the answer starts (generation: it depends
  on the prompt only) or at every scored position of a text (language modelling, per token). No label is read.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.tasks import Task
from evox_merge.tasks.batching import encode, scored_sequences
from evox_merge.tasks.scoring import pad_token_id

OBJECTIVES = ("entropy", "supervised")
"""AdaMerging's two objectives: the paper's entropy on unlabelled inputs, and the labelled loss on the search part."""
TERMS = ("loglik", *OBJECTIVES)


@dataclass
class ObjectiveBatch:
    """Rows of one task's examples, ready for one forward pass.

    Attributes:
        task: the task's index in the problem; kind: its type (``multiple_choice``, ``generation``,
            ``language_modeling``).
        input_ids, attention_mask: ``(B, L)``: context + target (decoder-only) or the context (encoder-decoder).
        decoder_input_ids: ``(B, T)`` the start token then the target but its last token (encoder-decoder), else None.
        positions: ``(B, T)`` decoder-only: the position whose logits predict each target token; else ``arange(T)``.
        targets, target_mask: ``(B, T)`` target token ids (0 on padding) and which are real.
        example: ``(B,)`` each row's example within the batch (``0..E-1``); choice: its choice index.
        answers: ``(E,)`` the right choice per example (multiple choice), else None.
        lengths: ``(B,)`` a choice's length in characters (``accuracy_norm``), else None.
    """

    task: int
    kind: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    decoder_input_ids: torch.Tensor | None
    positions: torch.Tensor
    targets: torch.Tensor
    target_mask: torch.Tensor
    example: torch.Tensor
    choice: torch.Tensor
    answers: torch.Tensor | None
    lengths: torch.Tensor | None

    @property
    def examples(self) -> int:
        """E, the examples in the batch."""
        return int(self.example.max()) + 1


def _example_rows(task: Task, tokenizer, seq2seq: bool) -> list[list[tuple[list[int], list[int], int]]]:
    """Per example, its rows ``(context ids, target ids, choice characters)``; examples with an empty target are
    left out (nothing to score)."""
    kind = task.spec.type
    if kind == "language_modeling":
        if seq2seq:
            source = encode(tokenizer, task.spec.prefix or "", special=True) or [tokenizer.eos_token_id or 0]
            rows = [[(source, encode(tokenizer, record["text"], special=False), 0)] for record in task.records]
        else:
            rows = [[(ids[:context], ids[context:], 0)] for ids, context in scored_sequences(task, tokenizer)]
    elif kind == "multiple_choice":
        rows = [[(encode(tokenizer, record["prompt"], special=True), encode(tokenizer, choice, special=False),
                  len(choice)) for choice in record["choices"]] for record in task.records]
    else:  # the answer, then EOS: greedy decoding ends there (`evox_merge.tasks.generation`), as exact match needs
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        rows = [[(encode(tokenizer, record["prompt"], special=True),
                  encode(tokenizer, record["answer"], special=False) + end, 0)] for record in task.records]
    return [example for example in rows if all(target and context for context, target, _ in example)]


def objective_batches(problem: MergeProblem, rows_per_batch: int = 8, one_example: bool = False,
                      one_row: bool = False) -> list[ObjectiveBatch]:
    """Every task of `problem` (its examples: the search part in a run) as `ObjectiveBatch`es of whole examples, at
    most `rows_per_batch` rows each (an example with more choices alone); `one_example`: one example per batch
    (per-example gradients); `one_row`: one row per batch, no padding (RegMean's inputs of an encoder-decoder)."""
    model, tokenizer = problem.experts.model, problem.experts.tokenizer
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    start = model.config.decoder_start_token_id if seq2seq else None
    start = start if start is not None else (model.config.pad_token_id or 0) if seq2seq else None
    batches = []
    for index, task in enumerate(problem.tasks):
        examples = [[(i, c, row) for c, row in enumerate(rows)]
                    for i, rows in enumerate(_example_rows(task, tokenizer, seq2seq))]
        answers = ([record["answer"] for record in task.records] if task.spec.type == "multiple_choice" else None)
        if one_row:
            groups = [[row] for example in examples for row in example]
        else:
            groups, current = [], []
            for example in examples:
                if current and (one_example or len(current) + len(example) > rows_per_batch):
                    groups.append(current)
                    current = []
                current = current + example
            groups += [current] if current else []
        for group in groups:
            batches.append(_batch(index, task, group, answers, pad, start, device))
    return batches


def _batch(index: int, task: Task, group: list, answers: list | None, pad: int, start: int | None,
           device) -> ObjectiveBatch:
    """One `ObjectiveBatch` of the rows ``(example, choice, (context, target, characters))`` in `group`."""
    local = {example: k for k, example in enumerate(dict.fromkeys(e for e, _, _ in group))}
    rows = len(group)
    longest_target = max(len(target) for _, _, (_, target, _) in group)
    targets = torch.zeros(rows, longest_target, dtype=torch.long)
    target_mask = torch.zeros(rows, longest_target, dtype=torch.bool)
    if start is None:  # decoder-only: one sequence, right-padded
        length = max(len(context) + len(target) for _, _, (context, target, _) in group)
        input_ids = torch.full((rows, length), pad, dtype=torch.long)
        positions = torch.zeros(rows, longest_target, dtype=torch.long)
        decoder = None
    else:
        length = max(len(context) for _, _, (context, _, _) in group)
        input_ids = torch.full((rows, length), pad, dtype=torch.long)
        positions = torch.arange(longest_target).expand(rows, -1).clone()
        decoder = torch.full((rows, longest_target), pad, dtype=torch.long)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    for r, (_, _, (context, target, _)) in enumerate(group):
        sequence = context + target if start is None else context
        input_ids[r, : len(sequence)] = torch.tensor(sequence)
        attention_mask[r, : len(sequence)] = 1
        targets[r, : len(target)] = torch.tensor(target)
        target_mask[r, : len(target)] = True
        if start is None:
            positions[r, : len(target)] = torch.arange(len(context) - 1, len(context) + len(target) - 1)
        else:
            decoder[r, : len(target)] = torch.tensor([start, *target[:-1]])
    example = torch.tensor([local[e] for e, _, _ in group])
    kept = list(local)
    to = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return ObjectiveBatch(
        index, task.spec.type, to(input_ids), to(attention_mask), to(decoder), to(positions), to(targets),
        to(target_mask), to(example), to(torch.tensor([c for _, c, _ in group])),
        to(torch.tensor([answers[e] for e in kept])) if answers is not None else None,
        to(torch.tensor([float(r[2]) for _, _, r in group])) if task.spec.metric == "accuracy_norm" else None)


def target_log_softmax(model: torch.nn.Module, batch: ObjectiveBatch, params: dict | None = None) -> torch.Tensor:
    """``(B, T, V)`` float32 log-probabilities of the next token at every target position of `batch` (differentiable;
    `params`: parameters to use instead of the model's, `torch.func.functional_call`)."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if batch.decoder_input_ids is not None:
        inputs.update(decoder_input_ids=batch.decoder_input_ids, decoder_attention_mask=batch.target_mask.long())
    outputs = model(**inputs) if params is None else torch.func.functional_call(model, params, (), inputs)
    logits = outputs.logits
    if batch.decoder_input_ids is None:
        logits = logits.gather(1, batch.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    return torch.log_softmax(logits.float(), dim=-1)


def batch_terms(model: torch.nn.Module, batch: ObjectiveBatch, term: str,
                params: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example of `batch`, the ``(numerator, denominator)`` of `term` (``loglik``, ``supervised``, ``entropy``:
    the module docstring), each ``(E,)`` float32, the numerator differentiable."""
    logprobs = target_log_softmax(model, batch, params)
    mask = batch.target_mask
    count = batch.examples
    if term == "entropy" and batch.kind != "multiple_choice":
        entropy = -(logprobs.exp() * logprobs).sum(-1)  # (B, T)
        if batch.kind == "generation":  # the first answer token: its distribution depends on the prompt alone
            return entropy[:, 0], torch.ones_like(entropy[:, 0])
        return (entropy * mask).sum(-1), mask.sum(-1).float()
    picked = logprobs.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    summed = (picked * mask).sum(-1)  # (B,)
    if batch.kind != "multiple_choice":
        if term == "loglik":
            return summed, torch.ones_like(summed)
        return -summed, mask.sum(-1).float()
    if batch.lengths is not None:
        summed = summed / batch.lengths
    most = int(batch.choice.max()) + 1
    table = summed.new_full((count, most), -torch.inf).index_put((batch.example, batch.choice), summed)
    choice_logprobs = torch.log_softmax(table, dim=-1)
    ones = torch.ones(count, device=summed.device)
    if term == "entropy":
        probabilities = choice_logprobs.exp()
        return -(probabilities * torch.where(probabilities > 0, choice_logprobs, 0)).sum(-1), ones
    right = choice_logprobs.gather(1, batch.answers.unsqueeze(1)).squeeze(1)
    return (right if term == "loglik" else -right), ones


def task_denominators(batches: Sequence[ObjectiveBatch], term: str, tasks: int) -> torch.Tensor:
    """Per task, the sum of `term`'s denominators over its examples (``(K,)``, from the batches alone: no model)."""
    totals = torch.zeros(tasks, dtype=torch.float64)
    for batch in batches:
        if term == "loglik" or batch.kind == "multiple_choice" or (term == "entropy" and batch.kind == "generation"):
            totals[batch.task] += batch.examples
        else:
            totals[batch.task] += float(batch.target_mask.sum())
    return totals


@contextmanager
def gradients_for(model: torch.nn.Module, parameters: Sequence[torch.nn.Parameter] = ()) -> Iterator[None]:
    """Within the block only `parameters` of `model` require gradients (none: only tensors outside the model, e.g.
    AdaMerging's coefficients); every ``requires_grad`` flag is put back and the gradients dropped on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
        parameter.grad = None
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for parameter in parameters:
            parameter.grad = None
