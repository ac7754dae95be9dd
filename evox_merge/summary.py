"""Score the release beside the baselines a user compares it with, on validation and (where given) test."""

from __future__ import annotations

from typing import Sequence

import torch

from evox_merge import baselines
from evox_merge.config import SearchConfig
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.tasks import TaskSpec

Scores = dict[str, dict[str, dict[str, float | None]]]


def _named(problem: MergeProblem, task_scores: torch.Tensor) -> dict[str, float | None]:
    values = {name: float(s) for name, s in zip(problem.task_names, task_scores)}
    values["mean"] = float(problem.aggregate(task_scores.unsqueeze(0))[0])
    return {key: (value if value == value and abs(value) != float("inf") else None) for key, value in values.items()}


def evaluate_release(
    search_problem: MergeProblem, specs: Sequence[TaskSpec], coefficients: torch.Tensor, config: SearchConfig
) -> tuple[Scores, dict[str, dict]]:
    """Per merge (``release``, and with ``release.baselines`` the base, best single expert, model soup and task
    arithmetic, each tuned on the search's own validation examples) and per split (whole validation files, and
    test files where given), every task's score and their weighted mean.

    Returns:
        ``(scores[merge][split][task or "mean"], settings[merge])``.
    """
    experts = search_problem.experts
    merges: dict[str, torch.Tensor] = {"release": coefficients}
    settings: dict[str, dict] = {"release": {"coefficients": coefficients.tolist()}}
    if config.release.baselines:
        for static in (
            baselines.base_model(search_problem),
            baselines.best_single_expert(search_problem),
            baselines.model_soup(search_problem),
            baselines.task_arithmetic(search_problem),
        ):
            merges[static.name] = static.coefficients
            settings[static.name] = static.settings
    candidates = torch.stack(list(merges.values()))
    splits = {"validation": MergeProblem(experts, specs, batch_size=config.batch_size)}
    tested = [spec.with_split("test") for spec in specs if spec.test_path]
    if tested:
        splits["test"] = MergeProblem(experts, tested, batch_size=config.batch_size)
    scores: Scores = {name: {} for name in merges}
    for split, problem in splits.items():
        task_scores = problem.evaluate_per_task(candidates)
        for index, name in enumerate(merges):
            scores[name][split] = _named(problem, task_scores[index])
    return scores, settings
