"""MergeProblem: an EvoX Problem that scores merge-coefficient vectors of LoRA experts on validation tasks."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from evox.core import Problem

from evox_merge.util.errors import MergeInputError
from evox_merge.experts import ExpertSet
from evox_merge.experts.merger import shared_merger
from evox_merge.experts.rows import candidate_rows
from evox_merge.experts.spaces import ExpertSpace, SearchSpace
from evox_merge.problems.normalisation import TaskNormalisation, identity_normalisation
from evox_merge.problems.racing import Racing, RacingState, survivors, task_estimates
from evox_merge.tasks.scorers import build_scorer
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
        space: SearchSpace | None = None,
        batch_tokens: int | None = None,
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
            space: how a candidate vector becomes per-layer coefficients (`evox_merge.experts.spaces`; default:
                one coefficient per expert). Candidates have `dim` entries; `in_space` writes expert-space
                vectors (the searches' starting points) in it; `evaluate_linear` scores expert-space merges
                (static merges, normalisation anchors) exactly in any space.
            batch_tokens: batches of at most this many padded tokens instead of `batch_size` rows (decoder-only
                models; `evox_merge.tasks.batching.cut_sorted`). None: `batch_size` rows per batch.
        """
        super().__init__()
        if not tasks:
            raise MergeInputError("MergeProblem needs at least one task")
        if batch_size < 1:
            raise MergeInputError(f"batch_size must be >= 1, got {batch_size}")
        if batch_tokens is not None and batch_tokens < 1:
            raise MergeInputError(f"batch_tokens must be >= 1 or None, got {batch_tokens}")
        self.batch_tokens = batch_tokens
        if isinstance(candidates_per_pass, bool) or not isinstance(candidates_per_pass, int) or candidates_per_pass < 1:
            raise MergeInputError(f"candidates_per_pass must be an integer >= 1, got {candidates_per_pass!r}")
        self.candidates_per_pass = candidates_per_pass
        self._parts: list | None = None  # per task (numerators, denominators) while recording_example_parts
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
        self.scorers = [build_scorer(task, experts.tokenizer, batch_size, device, model_config=experts.model.config,
                                     batch_tokens=batch_tokens) for task in self.tasks]
        self.merger = shared_merger(experts)
        self.space = space if space is not None else ExpertSpace(tuple(experts.target_names),
                                                                 tuple(experts.expert_names))
        if list(self.space.layer_names) != experts.target_names or list(self.space.expert_names) != experts.expert_names:
            raise MergeInputError("the search space was built for other target layers or experts than these")
        if self.space.kind in ("operator", "perturbation") and candidates_per_pass > 1:
            raise MergeInputError("candidates_per_pass > 1 runs the experts' factors unmerged, which an operator "
                                  "space (a dense delta per layer) cannot; use 1")
        if experts.model.config.is_encoder_decoder and candidates_per_pass > 1:
            raise MergeInputError("candidates_per_pass > 1 is decoder-only; an encoder-decoder model scores one "
                                  "candidate at a time: use 1")
        if experts.dense and candidates_per_pass > 1:
            raise MergeInputError("candidates_per_pass > 1 runs LoRA experts' factors unmerged; dense experts' task "
                                  "vectors merge in place only: use 1")
        self.normalisation = identity_normalisation(self.task_names)
        self.batch_size = batch_size
        self.racing: Racing | None = None
        self.racing_state: RacingState | None = None
        self.examples_total = sum(len(task.records) for task in self.tasks)
        self.examples_scored: list[int] = []  # per candidate of the last evaluation

    def race(self, racing: Racing | None, threshold: Callable[[torch.Tensor], float] | None = None) -> "MergeProblem":
        """Score populations with racing from now on (`evox_merge.problems.racing`; None: off); returns self.

        Args:
            threshold: the algorithm's `racing_threshold` (`evox_merge.algorithms.common.RacingQuota`): the
                population's lower bounds -> the fitness a candidate must be able to reach to be used. None: the
                algorithm uses every candidate, so nothing is dropped."""
        if racing is not None and (self.per_task_fitness or self.candidates_per_pass > 1):
            raise MergeInputError("racing needs one fitness per candidate scored one candidate at a time: it does "
                                  "not combine with per-task (multi-objective) fitness or candidates_per_pass > 1")
        self.racing = racing
        self._racing_threshold = threshold
        self.racing_state = RacingState(racing.top_k) if racing is not None else None
        self._stage_scorers = None
        return self

    def candidate_annotations(self) -> dict[str, list[int] | int]:
        """For the run's records: how many validation examples each candidate of the last evaluation was
        scored on, out of how many (fewer only under racing)."""
        return {"examples_scored": list(self.examples_scored), "examples_total": self.examples_total}

    def normalise(self, normalisation: TaskNormalisation) -> "MergeProblem":
        """Use `normalisation` in the fitness from now on (its tasks must be this problem's); returns self."""
        if list(normalisation.task_names) != self.task_names:
            raise MergeInputError(f"normalisation is for tasks {list(normalisation.task_names)}, "
                                  f"this problem scores {self.task_names}")
        self.normalisation = normalisation
        return self

    @property
    def num_experts(self) -> int:
        """N, the number of experts."""
        return self.experts.num_experts

    @property
    def dim(self) -> int:
        """D, the length of each candidate vector (N in the default expert space)."""
        return self.space.dim

    def in_space(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Expert-space coefficients ``(P, N)`` written as candidates of this problem's space ``(P, D)`` (the same
        merges)."""
        return self.space.from_expert(coefficients)

    def evaluate_linear(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Scores ``(P, K)`` of the linear merges ``theta_0 + sum_i c_i tau_i`` of expert-space `coefficients`
        ``(P, N)``, exactly, whatever this problem's space: the base, each expert alone, task arithmetic, model
        soups (static merges and the normalisation's anchors). The expert and layer spaces write them as their own
        candidates (`in_space`); an operator space cannot (TIES elects signs over every expert's task vector even at
        density 1 and averages the agreeing entries, so its one-hot is not the expert), so they are scored as
        expert-space merges (without racing)."""
        if self.space.kind in ("expert", "layer"):
            return self.evaluate_per_task(self.in_space(coefficients))
        space, racing = self.space, self.racing
        self.space, self.racing = ExpertSpace(tuple(space.layer_names), tuple(space.expert_names)), None
        try:
            return self.evaluate_per_task(coefficients)
        finally:
            self.space, self.racing = space, racing

    def check_population(self, pop: torch.Tensor) -> torch.Tensor:
        """Reject a population that is not a finite ``(P, N)`` float tensor; return it as float32 on CPU."""
        if not isinstance(pop, torch.Tensor):
            raise MergeInputError(f"coefficients must be a tensor, got {type(pop).__name__}")
        if pop.ndim == 1:
            pop = pop.unsqueeze(0)
        if pop.ndim != 2 or pop.shape[1] != self.dim:
            what = "one per expert" if self.dim == self.num_experts and self.space.kind == "expert" else (
                f"the {self.space.kind} space's dimensions")
            raise MergeInputError(f"coefficients must have shape (P, {self.dim}) ({what}), got {tuple(pop.shape)}")
        if not torch.isfinite(pop).all():
            bad = sorted(set(torch.nonzero(~torch.isfinite(pop))[:, 0].tolist()))
            raise MergeInputError(f"coefficients of candidate(s) {bad} are NaN or infinite")
        return pop.detach().float()

    def evaluate_per_task(self, pop: torch.Tensor) -> torch.Tensor:
        """Scores of every candidate on every task: ``pop (P, N)`` -> ``(P, K)`` float64 (NaN where unscorable).
        Under racing, a dropped candidate's scores are its estimates (see `examples_scored`)."""
        pop = self.check_population(pop)
        if self.racing is not None:
            return self._evaluate_racing(pop)
        self.examples_scored = [self.examples_total] * pop.shape[0]
        scores = torch.empty(pop.shape[0], len(self.scorers), dtype=torch.float64)
        if self.candidates_per_pass > 1:
            self.merger.restore()  # the rows path adds the deltas to W0 itself
            for start in range(0, pop.shape[0], self.candidates_per_pass):
                chunk = pop[start : start + self.candidates_per_pass]
                if self.space.kind != "expert":
                    chunk = self.space.layer_coefficients(chunk)
                with candidate_rows(self.experts, chunk) as copies:
                    for k, scorer in enumerate(self.scorers):
                        scores[start : start + copies, k] = torch.tensor(scorer.scores(self.experts.model, copies))
            return scores
        try:
            for p, coefficients in enumerate(pop):
                self._write_candidate(coefficients)
                for k, scorer in enumerate(self.scorers):
                    scores[p, k] = self._score(scorer)
        finally:
            self.merger.restore()
        return scores

    def _score(self, scorer) -> float:
        """One task's score of the merge written in the model (while `recording_example_parts`, from its
        per-example parts, which are kept)."""
        if self._parts is None:
            return scorer.score(self.experts.model)
        numerators, denominators = scorer.example_parts(self.experts.model)
        self._parts.append((numerators, denominators))
        return float(numerators.sum() / denominators.sum())

    @contextmanager
    def recording_example_parts(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Within the block, scoring one merge (any path: `evaluate_per_task` of one candidate, `evaluate_linear`,
        `evaluate_deltas`, `StaticMerge.score`) also fills the yielded list with its per-task
        ``(numerators, denominators)`` per example (the scorers' `example_parts`; a task's score is
        ``sum(numerators) / sum(denominators)``), for paired comparisons of merges on the same examples. Scores one
        candidate per pass and without racing meanwhile."""
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        saved = self.candidates_per_pass, self.racing, self._parts
        self.candidates_per_pass, self.racing, self._parts = 1, None, parts
        try:
            yield parts
        finally:
            self.candidates_per_pass, self.racing, self._parts = saved

    def _write_candidate(self, candidate: torch.Tensor) -> None:
        """Write one candidate's merge into the model: ``(N,)`` coefficients in the expert space, ``(L, N)`` in a
        layer space (both one fused update per layer), dense deltas in an operator space."""
        if self.space.kind in ("operator", "perturbation"):
            self.merger.apply_deltas(self.space.deltas(candidate, self.experts.targets))
        else:
            self.merger.apply(candidate if self.space.kind == "expert" else self.space.layer_coefficients(candidate))

    def _part_scorer(self, task: Task, records: list[dict]):
        """A scorer over some of `task`'s records (tokenised now): racing's stages, subsample mode's subsets."""
        return build_scorer(Task(task.spec, records), self.experts.tokenizer, self.batch_size,
                            next(self.experts.model.parameters()).device, model_config=self.experts.model.config,
                            batch_tokens=self.batch_tokens)

    def subset_scorers(self, indices: Sequence[Sequence[int]]) -> list:
        """Per task, a scorer over its examples at `indices[k]` (positions in the task's records, in that order;
        tokenised now, once): what `scoring_on` takes (`evox_merge.problems.subsample`)."""
        if len(indices) != len(self.tasks):
            raise MergeInputError(f"subset_scorers: expected one index list per task ({len(self.tasks)}), got "
                                  f"{len(indices)}")
        return [self._part_scorer(task, [task.records[int(i)] for i in index])
                for task, index in zip(self.tasks, indices)]

    @contextmanager
    def scoring_on(self, scorers: list) -> Iterator[None]:
        """Within the block every path that scores a merge on this problem's tasks uses `scorers` (one per task,
        e.g. `subset_scorers`) instead of the scorers over all their examples."""
        if len(scorers) != len(self.scorers):
            raise MergeInputError(f"scoring_on: expected one scorer per task ({len(self.scorers)}), got {len(scorers)}")
        saved, self.scorers = self.scorers, list(scorers)
        try:
            yield
        finally:
            self.scorers = saved

    def _stages(self) -> list[list]:
        """Per task, one scorer per racing stage over that stage's new examples (None where a stage adds none)."""
        if self._stage_scorers is None:
            self._stage_scorers = []
            for task in self.tasks:
                total, start, scorers = len(task.records), 0, []
                for fraction in self.racing.stages:
                    end = max(start, min(total, max(1, math.ceil(fraction * total))))
                    scorers.append(self._part_scorer(task, task.records[start:end]) if end > start else None)
                    start = end
                self._stage_scorers.append(scorers)
        return self._stage_scorers

    def _evaluate_racing(self, pop: torch.Tensor) -> torch.Tensor:
        """Score in stages, dropping candidates that cannot reach the part of the population the search uses."""
        racing, stages = self.racing, self._stages()
        count, tasks = pop.shape[0], len(self.tasks)
        parts = [[([], []) for _ in range(tasks)] for _ in range(count)]
        totals = [len(task.records) for task in self.tasks]
        binary = [task.spec.type != "language_modeling" for task in self.tasks]
        alive = torch.ones(count, dtype=torch.bool)
        estimates = torch.full((count, tasks), math.nan, dtype=torch.float64)
        slope = (self.normalisation.apply(torch.ones(1, tasks)) - self.normalisation.apply(torch.zeros(1, tasks)))[0]
        for stage in range(len(racing.stages)):
            try:
                for p in alive.nonzero().flatten().tolist():
                    self._write_candidate(pop[p])
                    for k in range(tasks):
                        if stages[k][stage] is not None:
                            numerator, denominator = stages[k][stage].example_parts(self.experts.model)
                            parts[p][k][0].append(numerator)
                            parts[p][k][1].append(denominator)
            finally:
                self.merger.restore()
            errors = torch.zeros(count, dtype=torch.float64)
            for p in alive.nonzero().flatten().tolist():
                task_scores, task_errors = task_estimates(
                    [torch.cat(num) for num, _ in parts[p]], [torch.cat(den) for _, den in parts[p]], totals, binary,
                    racing.z)
                estimates[p] = task_scores
                errors[p] = float(((slope * self.task_weights) ** 2 * task_errors ** 2).sum().sqrt())
            if stage == len(racing.stages) - 1:
                break
            # Dropped candidates keep the estimate they were dropped with.
            fitness = (self.normalisation.apply(estimates) @ self.task_weights).nan_to_num(nan=-math.inf)
            alive = survivors(fitness, errors, alive, racing, self.racing_state, self._racing_threshold)
        self.examples_scored = [sum(sum(n.numel() for n in num) for num, _ in parts[p]) for p in range(count)]
        complete = [p for p in range(count) if self.examples_scored[p] == self.examples_total]
        if complete:
            self.racing_state.add(self.aggregate(estimates[complete]).tolist())
        return estimates

    def evaluate_deltas(self, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores ``(K,)`` of the model ``W0 + delta`` per named target layer (for dense merges such as TIES)."""
        try:
            self.merger.apply_deltas(deltas)
            return torch.tensor([self._score(scorer) for scorer in self.scorers], dtype=torch.float64)
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
