"""Score the release beside the baselines a user compares it with, on validation and (where given) test."""

from __future__ import annotations

from typing import Sequence

import torch

from evox_merge import baselines
from evox_merge.config import SearchConfig
from evox_merge.experts import ExpertSet
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.tasks import TaskSpec

Scores = dict[str, dict[str, dict[str, float | None]]]


def _named(problem: MergeProblem, task_scores: torch.Tensor) -> dict[str, float | None]:
    values = {name: float(s) for name, s in zip(problem.task_names, task_scores)}
    values["mean"] = float(problem.aggregate(task_scores.unsqueeze(0))[0])
    return {key: (value if value == value and abs(value) != float("inf") else None) for key, value in values.items()}


def evaluate_release(
    experts: ExpertSet, specs: Sequence[TaskSpec], coefficients: torch.Tensor, config: SearchConfig
) -> tuple[Scores, dict[str, dict]]:
    """Per merge (``release``, and with ``release.baselines`` the base, best single expert, model soup and task
    arithmetic, each tuned on validation) and per split, every task's score and their weighted mean.

    Returns:
        ``(scores[merge][split][task or "mean"], settings[merge])``.
    """
    validation = MergeProblem(experts, specs, batch_size=config.batch_size)
    merges: dict[str, torch.Tensor] = {"release": coefficients}
    settings: dict[str, dict] = {"release": {"coefficients": coefficients.tolist()}}
    if config.release.baselines:
        for static in (
            baselines.base_model(validation),
            baselines.best_single_expert(validation),
            baselines.model_soup(validation),
            baselines.task_arithmetic(validation),
        ):
            merges[static.name] = static.coefficients
            settings[static.name] = static.settings
    candidates = torch.stack(list(merges.values()))
    splits = {"validation": validation}
    tested = [spec.with_split("test") for spec in specs if spec.test_path]
    if tested:
        splits["test"] = MergeProblem(experts, tested, batch_size=config.batch_size)
    scores: Scores = {name: {} for name in merges}
    for split, problem in splits.items():
        task_scores = problem.evaluate_per_task(candidates)
        for index, name in enumerate(merges):
            scores[name][split] = _named(problem, task_scores[index])
    return scores, settings
