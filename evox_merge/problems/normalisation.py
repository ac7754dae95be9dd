"""Per-task normalisation: put every task's score on one scale before the weighted mean.

Raw scores live on different scales (accuracy in [0, 1], minus a language-modelling NLL from -4 to -11), so a raw
mean lets the widest-ranging task decide the search. Normalised, a task scores 0 at the base model and 1 at its
best single expert (measured once, on the examples the search sees):

    normalised_k = (score_k - base_k) / (best_single_k - base_k)

The scale is ``|best_single_k - base_k|``: where every expert is worse than the base on a task, its best single
expert sits at -1, so a higher raw score is always a higher normalised one. A task where no expert moves the base
(scale < `min_scale`) keeps its raw difference from the base (scale 1), so it neither explodes nor vanishes.
``normalise: none`` keeps raw scores (offset 0, scale 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

NORMALISATIONS = ("base_best_single", "none")


@dataclass(frozen=True)
class TaskNormalisation:
    """``normalised = (scores - offset) / scale`` per task.

    Attributes:
        mode: ``base_best_single`` or ``none``.
        task_names: the K tasks, in the problem's order.
        offset: ``(K,)`` float64, the base model's scores (0 for ``none``).
        scale: ``(K,)`` float64, best single expert minus base (1 for ``none`` and for flat tasks).
        best_single: per task, the expert that scored best on it (empty for ``none``).
    """

    mode: str
    task_names: tuple[str, ...]
    offset: torch.Tensor
    scale: torch.Tensor
    best_single: tuple[str, ...] = ()

    def apply(self, task_scores: torch.Tensor) -> torch.Tensor:
        """``(P, K)`` raw scores -> normalised scores (NaN stays NaN)."""
        return (task_scores.double() - self.offset) / self.scale

    def to_dict(self) -> dict[str, Any]:
        """For recipe.json: the mode, and per task its offset, scale and best single expert."""
        return {
            "mode": self.mode,
            "formula": "(score - offset) / scale" if self.mode == "none" else
            "(score - base) / (best single expert - base), measured on the search part",
            "tasks": {
                name: {"offset": float(self.offset[k]), "scale": float(self.scale[k]),
                       **({"best_single_expert": self.best_single[k]} if self.best_single else {})}
                for k, name in enumerate(self.task_names)
            },
        }


def identity_normalisation(task_names: list[str]) -> TaskNormalisation:
    """Raw scores (``normalise: none``)."""
    k = len(task_names)
    return TaskNormalisation("none", tuple(task_names), torch.zeros(k, dtype=torch.float64),
                             torch.ones(k, dtype=torch.float64))


def anchor_normalisation(problem, min_scale: float = 1e-6) -> TaskNormalisation:
    """Measure base (all coefficients 0) and each expert alone (one-hot) on `problem` (a `MergeProblem`): N + 1
    evaluations."""
    n = problem.num_experts
    scores = problem.evaluate_linear(torch.cat([torch.zeros(1, n), torch.eye(n)]))  # (1 + N, K), in any space
    return normalisation_from_anchors(problem.task_names, problem.experts.expert_names, scores, min_scale)


def normalisation_from_anchors(task_names: list[str], expert_names: list[str], scores: torch.Tensor,
                               min_scale: float = 1e-6) -> TaskNormalisation:
    """The ``base_best_single`` normalisation from anchor scores ``(1 + N, K)``: the base, then each expert alone."""
    base, experts = scores[0].double(), scores[1:].double()
    best_value, best_index = experts.nan_to_num(nan=-torch.inf).max(dim=0)
    scale = (best_value - base).abs()  # never negative: a higher raw score is always a higher normalised one
    flat = ~torch.isfinite(scale) | (scale < min_scale)
    return TaskNormalisation("base_best_single", tuple(task_names), base.nan_to_num(nan=0.0),
                             torch.where(flat, torch.ones_like(scale), scale),
                             tuple(expert_names[int(i)] for i in best_index))
