"""MergeProblem: an EvoX Problem that scores merge-coefficient vectors of LoRA experts on validation tasks."""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from evox.core import Problem

from evox_merge.util.errors import MergeInputError
from evox_merge.experts import ExpertSet
from evox_merge.experts.merger import shared_merger
from evox_merge.experts.rows import candidate_rows
from evox_merge.problems.normalisation import TaskNormalisation, identity_normalisation
from evox_merge.tasks.scoring import build_scorer
from evox_merge.tasks import Task, TaskSpec, read_task

logger = logging.getLogger(__name__)


class MergeProblem(Problem):
    """Fitness of merge coefficients: the merged model's validation scores, higher is better.

    A candidate ``c (N,)`` is the merged model ``W = W0 + sum_i c_i s_i B_i A_i`` in every target layer. For each
    candidate the merge is written into the base model in place (one ``addmm`` per layer), every task is scored
    in length-bucketed batches, and the original weights are restored when the population is done. No model
    copy, no PEFT adapter per candidate, nothing written to disk.

    Run it under ``StdWorkflow(..., opt_direction="max")`` (see `evox_merge.run.workflow.build_workflow`).
    """

    def __init__(
        self,
        experts: ExpertSet,
        tasks: Sequence[TaskSpec | Task],
        *,
        batch_size: int = 32,
        per_task_fitness: bool = False,
        invalid_fitness: float = -math.inf,
        candidates_per_pass: int = 1,
    ) -> None:
        """
        Args:
            experts: the base model and its N experts.
            tasks: K task specs (read and checked now) or already-read tasks; their ``weight`` gives the mean.
            batch_size: sequences per forward pass.
            per_task_fitness: `evaluate` returns the ``(P, K)`` matrix instead of the weighted mean (for
                multi-objective algorithms).
            invalid_fitness: the fitness given to a candidate whose score is NaN (ranked worst by default).
            candidates_per_pass: opt-in: score this many candidates in each forward pass, the experts' factors
                run unmerged with a coefficient per row (`evox_merge.experts.rows`) instead of merged into the
                weights; every batch then holds ``candidates_per_pass`` times `batch_size` rows. Meant for GPUs.
        """
        super().__init__()
        if not tasks:
            raise MergeInputError("MergeProblem needs at least one task")
        if batch_size < 1:
            raise MergeInputError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(candidates_per_pass, bool) or not isinstance(candidates_per_pass, int) or candidates_per_pass < 1:
            raise MergeInputError(f"candidates_per_pass must be an integer >= 1, got {candidates_per_pass!r}")
        self.candidates_per_pass = candidates_per_pass
        self.experts = experts
        self.tasks = [task if isinstance(task, Task) else read_task(task) for task in tasks]
        self.task_names = [task.name for task in self.tasks]
        weights = torch.tensor([task.spec.weight for task in self.tasks], dtype=torch.float64)
        if weights.sum() <= 0:
            raise MergeInputError("task weights must not all be zero")
        self.task_weights = weights / weights.sum()
        self.per_task_fitness = per_task_fitness
        self.invalid_fitness = invalid_fitness
        device = next(experts.model.parameters()).device
        self.scorers = [build_scorer(task, experts.tokenizer, batch_size, device) for task in self.tasks]
        self.merger = shared_merger(experts)
        self.normalisation = identity_normalisation(self.task_names)

    def normalise(self, normalisation: TaskNormalisation) -> "MergeProblem":
        """Use `normalisation` in the fitness from now on (its tasks must be this problem's); returns self."""
        if list(normalisation.task_names) != self.task_names:
            raise MergeInputError(f"normalisation is for tasks {list(normalisation.task_names)}, "
                                  f"this problem scores {self.task_names}")
        self.normalisation = normalisation
        return self

    @property
    def num_experts(self) -> int:
        """N, the length of each coefficient vector."""
        return self.experts.num_experts

    def check_population(self, pop: torch.Tensor) -> torch.Tensor:
        """Reject a population that is not a finite ``(P, N)`` float tensor; return it as float32 on CPU."""
        if not isinstance(pop, torch.Tensor):
            raise MergeInputError(f"coefficients must be a tensor, got {type(pop).__name__}")
        if pop.ndim == 1:
            pop = pop.unsqueeze(0)
        if pop.ndim != 2 or pop.shape[1] != self.num_experts:
            raise MergeInputError(
                f"coefficients must have shape (P, {self.num_experts}) (one per expert), got {tuple(pop.shape)}"
            )
        if not torch.isfinite(pop).all():
            bad = sorted(set(torch.nonzero(~torch.isfinite(pop))[:, 0].tolist()))
            raise MergeInputError(f"coefficients of candidate(s) {bad} are NaN or infinite")
        return pop.detach().float()

    def evaluate_per_task(self, pop: torch.Tensor) -> torch.Tensor:
        """Scores of every candidate on every task: ``pop (P, N)`` -> ``(P, K)`` float64 (NaN where unscorable)."""
        pop = self.check_population(pop)
        scores = torch.empty(pop.shape[0], len(self.scorers), dtype=torch.float64)
        if self.candidates_per_pass > 1:
            self.merger.restore()  # the rows path adds the deltas to W0 itself
            for start in range(0, pop.shape[0], self.candidates_per_pass):
                with candidate_rows(self.experts, pop[start : start + self.candidates_per_pass]) as copies:
                    for k, scorer in enumerate(self.scorers):
                        scores[start : start + copies, k] = torch.tensor(scorer.scores(self.experts.model, copies))
            return scores
        try:
            for p, coefficients in enumerate(pop):
                self.merger.apply(coefficients)
                for k, scorer in enumerate(self.scorers):
                    scores[p, k] = scorer.score(self.experts.model)
        finally:
            self.merger.restore()
        return scores

    def evaluate_deltas(self, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores ``(K,)`` of the model ``W0 + delta`` per named target layer (for dense merges such as TIES)."""
        try:
            self.merger.apply_deltas(deltas)
            return torch.tensor([scorer.score(self.experts.model) for scorer in self.scorers], dtype=torch.float64)
        finally:
            self.merger.restore()

    def aggregate(self, task_scores: torch.Tensor) -> torch.Tensor:
        """Weighted mean of the normalised task scores, ``(P, K)`` raw -> ``(P,)`` (see
        `evox_merge.problems.normalisation`; raw scores unless `normalise` was called); NaN rows become
        `invalid_fitness` with a warning."""
        fitness = self.normalisation.apply(task_scores) @ self.task_weights
        invalid = torch.isnan(fitness)
        if invalid.any():
            logger.warning(
                "candidate(s) %s scored NaN on some task; ranked worst (fitness %s)",
                invalid.nonzero().flatten().tolist(), self.invalid_fitness,
            )
            fitness = fitness.masked_fill(invalid, self.invalid_fitness)
        return fitness

    def fitness_from_scores(self, task_scores: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """The fitness `evaluate` returns for per-task scores ``(P, K)``: the weighted mean ``(P,)`` (or, with
        ``per_task_fitness``, the scores with NaN as `invalid_fitness`), on `like`'s device and float dtype."""
        if self.per_task_fitness:
            fitness = self.normalisation.apply(task_scores).nan_to_num(nan=self.invalid_fitness)
        else:
            fitness = self.aggregate(task_scores)
        if like is None:
            return fitness
        return fitness.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)

    def evaluate(self, pop: torch.Tensor) -> torch.Tensor:
        """Fitness of each candidate: ``pop (P, N)`` -> ``(P,)`` weighted mean score (or ``(P, K)`` with
        ``per_task_fitness``), higher is better, on ``pop``'s device."""
        return self.fitness_from_scores(self.evaluate_per_task(pop), like=pop)
