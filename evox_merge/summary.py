"""Score the release beside the baselines a user compares it with, on validation and (where given) test."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

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
    search_problem: MergeProblem,
    specs: Sequence[TaskSpec],
    coefficients: torch.Tensor,
    config: SearchConfig,
    progress: bool = False,
) -> tuple[Scores, dict[str, dict]]:
    """Per merge (``release``, and with ``release.baselines`` the base, best single expert, model soup and task
    arithmetic, each tuned on the search's own validation examples) and per split (whole validation files, and
    test files where given), every task's score and their weighted mean.

    With `progress`, a progress bar counts the baselines tuned and the merges scored per split.

    Returns:
        ``(scores[merge][split][task or "mean"], settings[merge])``.
    """
    experts = search_problem.experts
    splits = {"validation": MergeProblem(experts, specs, batch_size=config.batch_size)}
    tested = [spec.with_split("test") for spec in specs if spec.test_path]
    if tested:
        splits["test"] = MergeProblem(experts, tested, batch_size=config.batch_size)
    tuners = (baselines.base_model, baselines.best_single_expert, baselines.model_soup, baselines.task_arithmetic)
    if not config.release.baselines:
        tuners = ()
    bar = tqdm(total=len(tuners) + len(splits) * (1 + len(tuners)), desc="scoring release and baselines",
               unit="step", disable=not progress, leave=False)
    merges: dict[str, torch.Tensor] = {"release": coefficients}
    settings: dict[str, dict] = {"release": {"coefficients": coefficients.tolist()}}
    for tune in tuners:
        bar.set_postfix_str(f"tuning {tune.__name__} on the search's validation examples")
        static = tune(search_problem)
        merges[static.name] = static.coefficients
        settings[static.name] = static.settings
        bar.update()
    scores: Scores = {name: {} for name in merges}
    for split, problem in splits.items():
        for name, merge in merges.items():
            bar.set_postfix_str(f"{split}: {name}")
            scores[name][split] = _named(problem, problem.evaluate_per_task(merge.unsqueeze(0))[0])
            bar.update()
    bar.close()
    return scores, settings
