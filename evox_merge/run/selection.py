"""Score the release beside the baselines a user compares it with, on validation and (where given) test."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from evox_merge.run.config import SearchConfig
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.static_merges import STATIC_MERGES, StaticMerge, tune_static_merge
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
    """Per merge (``release``, and with ``release.baselines`` every static merge of
    `evox_merge.problems.static_merges.STATIC_MERGES`, each tuned on the search's own validation examples) and per
    split (whole validation files, and test files where given), every task's score and their weighted mean.

    With `progress`, a progress bar counts the static merges tuned and the merges scored per split.

    Returns:
        ``(scores[merge][split][task or "mean"], settings[merge])``.
    """
    experts = search_problem.experts
    splits = {"validation": MergeProblem(experts, specs, batch_size=config.batch_size)}
    tested = [spec.with_split("test") for spec in specs if spec.test_path]
    if tested:
        splits["test"] = MergeProblem(experts, tested, batch_size=config.batch_size)
    names = list(STATIC_MERGES) if config.release.baselines else []
    bar = tqdm(total=len(names) + len(splits) * (1 + len(names)), desc="scoring release and baselines",
               unit="step", disable=not progress, leave=False)
    release = StaticMerge("release", {"coefficients": coefficients.tolist()}, torch.empty(0), math.nan,
                          coefficients=coefficients)
    merges: dict[str, StaticMerge] = {"release": release}
    for name in names:
        bar.set_postfix_str(f"tuning {name} on the search's validation examples")
        merges[name] = tune_static_merge(name, search_problem, seed=config.seed)
        bar.update()
    scores: Scores = {name: {} for name in merges}
    for split, problem in splits.items():
        for name, merge in merges.items():
            bar.set_postfix_str(f"{split}: {name}")
            scores[name][split] = _named(problem, merge.score(problem))
            bar.update()
    bar.close()
    return scores, {name: merge.settings for name, merge in merges.items()}
