"""The EvoX workflow evox-merge runs: `StdWorkflow` with the right direction, per-task scores for the monitor
and uneven distributed shards.

- **Direction.** Every evox-merge problem returns higher-is-better fitness while EvoX algorithms minimise;
  `build_workflow` always uses ``opt_direction="max"``.
- **Per-task scores.** For a problem with ``evaluate_per_task`` and ``fitness_from_scores`` (`MergeProblem`),
  `MergeWorkflow` asks for the ``(P, K)`` per-task scores, hands them to a monitor that declares
  ``accepts_task_scores = True`` (`evox_merge.run.monitor.RunMonitor`) and gives the algorithm the problem's own
  fitness of those scores. Other monitors (EvoX's `EvalMonitor`) and other problems see plain fitness.
- **Objective vectors.** With ``objectives`` (`evox_merge.run.objectives.Objectives`, for a multi-objective
  algorithm) the algorithm gets the ``(P, M)`` objective matrix instead of the mean; ``opt_direction="max"``
  multiplies it by a scalar -1, so every objective is minimised (tests/test_pareto.py checks it).
- **Subsample mode.** With a ``subsample`` (`evox_merge.problems.subsample.Subsampler`), each population and the
  run's elites are scored on the generation's subset of the search part, the algorithm gets the candidates'
  paired estimates, and what it holds from earlier generations is rewritten with the current estimates before it
  compares anything (`refresh_held_fitness`). The subsampler's ledger rides in the workflow's ``state_dict``.
- **Distributed.** EvoX's `StdWorkflow` splits each population across ranks with `tensor_split` and
  `all_gather`s the fitness; with the gloo backend that fails when the population size is not a multiple of the
  world size. `MergeWorkflow` pads every shard to the largest one for the gather and drops the padding.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from evox.core import Algorithm, Monitor, Problem
from evox.workflows import StdWorkflow

from evox_merge.algorithms.cmaes import BoundedCMAES
from evox_merge.algorithms.evogm import EvoGM
from evox_merge.algorithms.pso import BoundedPSO
from evox_merge.algorithms.random_search import RandomSearch
from evox_merge.util.errors import MergeInputError


def _gather_rows(local: torch.Tensor, sizes: list[int], group: Any) -> torch.Tensor:
    """All-gather row blocks of different sizes (padded to the largest) and concatenate them in rank order."""
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: len(local)] = local
    blocks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(blocks, padded, group=group)
    return torch.cat([block[:size] for block, size in zip(blocks, sizes)])


def _has_task_scores(problem: Problem) -> bool:
    return callable(getattr(problem, "evaluate_per_task", None)) and callable(
        getattr(problem, "fitness_from_scores", None))


class MergeWorkflow(StdWorkflow):
    """`StdWorkflow` with per-task scores for the monitor and distributed evaluation for any population size
    (see the module docstring)."""

    objectives = None  # an `Objectives` when the algorithm gets objective vectors (set by `build_workflow`)

    def _evaluate(self, population: torch.Tensor) -> torch.Tensor:
        if getattr(self, "subsample", None) is not None:
            return self._evaluate_subsample(population)
        per_task = _has_task_scores(self.problem)
        if not isinstance(population, torch.Tensor) or not (self.enable_distributed or per_task):
            return super()._evaluate(population)
        self.monitor.post_ask(population)
        sizes = [len(population)]
        if self.enable_distributed:
            world_size = dist.get_world_size(group=self.group)
            shards = population.tensor_split(world_size, dim=0)
            sizes = [len(shard) for shard in shards]
            population = shards[dist.get_rank(group=self.group)]
        local = self.solution_transform(population)
        self.monitor.pre_eval(local)
        with torch.random.fork_rng(devices=[local.device] if local.is_cuda else []):
            result = self.problem.evaluate_per_task(local) if per_task else self.problem.evaluate(local)
        if self.enable_distributed:
            result = _gather_rows(result.to(local.device), sizes, self.group)
        if per_task and self.objectives is not None:
            fitness = self.objectives.fitness(self.problem, result, like=local)
        else:
            fitness = self.problem.fitness_from_scores(result, like=local) if per_task else result
        self.monitor.post_eval(result if per_task and getattr(self.monitor, "accepts_task_scores", False)
                               else fitness)
        fitness = self.fitness_transform(fitness)
        self.monitor.pre_tell(fitness)
        return fitness

    def _evaluate_subsample(self, population: torch.Tensor) -> torch.Tensor:
        """Subsample mode: the population and the elites on this generation's subset; the algorithm gets the
        estimates and its held fitness is rewritten with the current ones (see the module docstring)."""
        subsample, problem = self.subsample, self.problem
        self.monitor.post_ask(population)
        local = self.solution_transform(population)
        self.monitor.pre_eval(local)
        with torch.random.fork_rng(devices=[local.device] if local.is_cuda else []):
            raw, estimates = subsample.evaluate(problem, local)
        dtype = local.dtype if local.is_floating_point() else torch.float32
        fitness = subsample.entry_fitness(problem, estimates).to(device=local.device, dtype=dtype)

        def held(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            values, known = subsample.fitness_of(problem, rows)
            return self.fitness_transform(values.to(device=local.device, dtype=dtype)), known

        refresh_held_fitness(self.algorithm, held)
        self.monitor.post_eval(raw if getattr(self.monitor, "accepts_task_scores", False) else fitness)
        fitness = self.fitness_transform(fitness)
        self.monitor.pre_tell(fitness)
        return fitness


HeldFitness = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Candidates ``(H, D)`` -> their current fitness as the algorithm sees it (minimised) ``(H,)`` and whether each
is known ``(H,)``."""


def check_subsample_algorithm(algorithm: Algorithm) -> None:
    """MergeInputError unless subsample mode keeps `algorithm`'s comparisons paired (`refresh_held_fitness`)."""
    if isinstance(algorithm, EvoGM) and algorithm.objectives != "scalar":
        raise MergeInputError("subsample: EvoGM with pareto objectives is not supported (one fitness per candidate)")
    if not isinstance(algorithm, (EvoGM, BoundedCMAES, BoundedPSO, RandomSearch)):
        raise MergeInputError(f"subsample: {type(algorithm).__name__} keeps fitness that the subsample mode cannot "
                              "keep paired; it works with evogm (scalar), cmaes, pso and random")


def refresh_held_fitness(algorithm: Algorithm, held: HeldFitness) -> None:
    """Rewrite the fitness `algorithm` keeps from earlier generations with the current estimates (subsample mode),
    so that what it compares next is on one footing.

    EvoGM: its whole history (the round archive its winners and losers, basis and carried elites come from) and its
    population's fitness. PSO: its personal and global bests (each particle's new fitness is compared with them).
    Random search: its best. CMA-ES ranks only the population just evaluated and keeps no fitness."""
    if isinstance(algorithm, EvoGM):
        history = algorithm.history
        if len(history):
            values, known = held(history.original_coefficients)
            history.fitness[known] = values.cpu().to(history.fitness.dtype)[known]
            index = algorithm._pop_index  # history rows of its population (EvoGM's own bookkeeping)
            if int(index.max()) < len(history):
                algorithm.fit = history.fitness[index].to(algorithm.fit.device)
    elif isinstance(algorithm, BoundedPSO):
        values, known = held(algorithm.local_best_location)  # its new `fit` is what this evaluation returns
        current = algorithm.local_best_fit
        algorithm.local_best_fit = torch.where(known.to(current.device), values.to(current.dtype), current)
        values, known = held(algorithm.global_best_location[None])
        if bool(known[0]):
            algorithm.global_best_fit = values[0].to(algorithm.global_best_fit.dtype)
    elif isinstance(algorithm, RandomSearch):
        values, known = held(algorithm.best_coefficients[None])
        if bool(known[0]):
            algorithm.best_fitness = values[0].to(algorithm.best_fitness.dtype)
    elif not isinstance(algorithm, BoundedCMAES):
        check_subsample_algorithm(algorithm)


def build_workflow(
    algorithm: Algorithm, problem: Problem, monitor: Monitor | None = None, objectives: Any = None,
    subsample: Any = None, **workflow_kwargs: Any
) -> MergeWorkflow:
    """``MergeWorkflow(algorithm, problem, monitor, opt_direction="max", ...)``.

    Every evox-merge problem returns higher-is-better fitness while EvoX algorithms minimise; the workflow
    negates fitness before the algorithm sees it. `objectives` (an `evox_merge.run.objectives.Objectives`) gives a
    multi-objective algorithm the ``(P, M)`` objective matrix of a per-task problem. `subsample` (an
    `evox_merge.problems.subsample.Subsampler`) turns subsample mode on (one process, one fitness per candidate,
    an algorithm `check_subsample_algorithm` accepts). Extra keyword arguments go to `StdWorkflow` (``device``,
    ``enable_distributed``, ``group``, transforms).
    """
    if "opt_direction" in workflow_kwargs:
        raise TypeError("build_workflow always uses opt_direction='max'; build StdWorkflow yourself to change it")
    workflow = MergeWorkflow(algorithm, problem, monitor=monitor, opt_direction="max", **workflow_kwargs)
    workflow.objectives = objectives
    if subsample is not None:
        if objectives is not None or workflow.enable_distributed:
            raise MergeInputError("subsample: needs one fitness per candidate scored in one process (not objective "
                                  "vectors or a distributed run)")
        check_subsample_algorithm(algorithm)
        workflow.subsample = subsample  # a submodule: its ledger is saved with the workflow's state_dict
    return workflow
