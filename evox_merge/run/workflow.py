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
- **Distributed.** EvoX's `StdWorkflow` splits each population across ranks with `tensor_split` and
  `all_gather`s the fitness; with the gloo backend that fails when the population size is not a multiple of the
  world size. `MergeWorkflow` pads every shard to the largest one for the gather and drops the padding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from evox.core import Algorithm, Monitor, Problem
from evox.workflows import StdWorkflow


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


def build_workflow(
    algorithm: Algorithm, problem: Problem, monitor: Monitor | None = None, objectives: Any = None,
    **workflow_kwargs: Any
) -> MergeWorkflow:
    """``MergeWorkflow(algorithm, problem, monitor, opt_direction="max", ...)``.

    Every evox-merge problem returns higher-is-better fitness while EvoX algorithms minimise; the workflow
    negates fitness before the algorithm sees it. `objectives` (an `evox_merge.run.objectives.Objectives`) gives a
    multi-objective algorithm the ``(P, M)`` objective matrix of a per-task problem. Extra keyword arguments go to
    `StdWorkflow` (``device``, ``enable_distributed``, ``group``, transforms).
    """
    if "opt_direction" in workflow_kwargs:
        raise TypeError("build_workflow always uses opt_direction='max'; build StdWorkflow yourself to change it")
    workflow = MergeWorkflow(algorithm, problem, monitor=monitor, opt_direction="max", **workflow_kwargs)
    workflow.objectives = objectives
    return workflow
