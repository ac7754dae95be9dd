"""Score a freshly built zoo's base and experts on every task's validation split, for its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from evox_merge.experts import ExpertSet
from evox_merge.problems import MergeProblem
from evox_merge.tasks import TaskSpec


def base_and_expert_scores(
    base_dir: Path, adapter_dirs: Sequence[Path], expert_names: Sequence[str], tasks: Sequence[TaskSpec]
) -> dict[str, dict[str, float]]:
    """Validation scores of the base (all coefficients 0) and of each expert alone (coefficient 1), scored by
    `MergeProblem` exactly as a search would: ``{"base": {task: score}, expert_name: {task: score}, ...}``."""
    experts = ExpertSet.load(base_dir, adapter_dirs)
    problem = MergeProblem(experts, list(tasks), batch_size=64)
    n = len(adapter_dirs)
    population = torch.cat([torch.zeros(1, n), torch.eye(n)])  # (1 + N, N): the base, then each expert alone
    scores = problem.evaluate_per_task(population)  # (1 + N, K)
    rows = ["base", *expert_names]
    return {
        row: {task.name: round(float(scores[i, k]), 6) for k, task in enumerate(tasks)} for i, row in enumerate(rows)
    }
