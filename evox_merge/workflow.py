"""The EvoX workflow evox-merge runs: `StdWorkflow` with the right direction and uneven distributed shards.

Under ``enable_distributed=True`` EvoX's `StdWorkflow` splits each population across ranks with `tensor_split`
and `all_gather`s the fitness; with the gloo backend that fails when the population size is not a multiple of
the world size. `MergeWorkflow` pads every shard to the largest one for the gather and drops the padding, and
also gathers a `MergeProblem`'s per-task scores so that rank 0 can record every candidate.
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


class MergeWorkflow(StdWorkflow):
    """`StdWorkflow` whose distributed evaluation works for any population size (see the module docstring)."""

    def _evaluate(self, population: torch.Tensor) -> torch.Tensor:
        if not self.enable_distributed or not isinstance(population, torch.Tensor):
            return super()._evaluate(population)
        self.monitor.post_ask(population)
        world_size = dist.get_world_size(group=self.group)
        rank = dist.get_rank(group=self.group)
        shards = population.tensor_split(world_size, dim=0)
        sizes = [len(shard) for shard in shards]
        local = self.solution_transform(shards[rank])
        self.monitor.pre_eval(local)
        with torch.random.fork_rng(devices=[local.device] if local.is_cuda else []):
            fitness = self.problem.evaluate(local)
        fitness = _gather_rows(fitness, sizes, self.group)
        task_scores = getattr(self.problem, "last_task_scores", None)
        if task_scores is not None:
            gathered = _gather_rows(task_scores.to(fitness.device), sizes, self.group)
            self.problem.last_task_scores = gathered.cpu()
        self.monitor.post_eval(fitness)
        fitness = self.fitness_transform(fitness)
        self.monitor.pre_tell(fitness)
        return fitness


def build_workflow(
    algorithm: Algorithm, problem: Problem, monitor: Monitor | None = None, **workflow_kwargs: Any
) -> MergeWorkflow:
    """``MergeWorkflow(algorithm, problem, monitor, opt_direction="max", ...)``.

    Every evox-merge problem returns higher-is-better fitness while EvoX algorithms minimise; the workflow
    negates fitness before the algorithm and the monitor sees it. Extra keyword arguments go to `StdWorkflow`
    (``device``, ``enable_distributed``, ``group``, transforms).
    """
    if "opt_direction" in workflow_kwargs:
        raise TypeError("build_workflow always uses opt_direction='max'; build StdWorkflow yourself to change it")
    return MergeWorkflow(algorithm, problem, monitor=monitor, opt_direction="max", **workflow_kwargs)
