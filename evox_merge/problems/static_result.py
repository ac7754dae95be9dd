"""A static merge's result (`StaticMerge`: its settings, scores and coefficients or merged deltas) and the tuning
helpers every static merge shares (the scaling grid, the grid-edge flag). Its own module so that the merges
(`static_merges`, `static_methods`, `data_aware`, `adamerging`) import it without importing one another."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from evox_merge.experts.kernel import target_delta
from evox_merge.problems.merge_problem import MergeProblem

DEFAULT_SCALINGS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5)
"""The scaling grid of task arithmetic, TIES and DARE: up to 1.5 (2 more evaluations per tuned method than the old
0.1..1.0), so that TIES's choice of 1.0 (t5, smollm2) is no longer the grid's edge and task arithmetic's tuned
scale stays inside the default search box (`evox_merge.algorithms.limits.DEFAULT_UB`); on the tiny zoo every
choice's top is interior (benchmarks/results/search_box.md). A choice on the edge says so in its settings
(``on_grid_edge``)."""


@dataclass
class StaticMerge:
    """One static merge and its validation scores.

    Attributes:
        name: ``base``, ``best_single``, ``model_soup``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
            or another key of `STATIC_MERGES`.
        settings: the hyperparameters used (the chosen ones where tuned).
        validation_scores: ``(K,)`` per-task scores on the problem it was chosen on.
        fitness: their weighted mean.
        coefficients: ``(N,)`` for linear merges (``(D,)`` in `space` for a searched candidate), else None.
        deltas: merged weight delta per target layer, held (a MERGEvolve stage's, Fisher's, RegMean's), else None.
        space: the search space `coefficients` are in (`evox_merge.experts.spaces`; None: one per expert).
        rebuild: for a merge whose deltas are not held (TIES, DARE, DELLA, the other merged-delta merges, AdaMerging),
            a function that recomputes them from the chosen settings (random masks from the recorded seed, so
            the same deltas every call): a tuned merge then keeps no dense tensor between its scorings, which at
            1B-8B parameters would be 4-32 GB per merge in the release contest (`delta_dict`).
    """

    name: str
    settings: dict
    validation_scores: torch.Tensor | None = field(default=None, repr=False)
    fitness: float = math.nan
    coefficients: torch.Tensor | None = None
    deltas: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    space: Any = field(default=None, repr=False)
    rebuild: Callable[[], dict[str, torch.Tensor]] | None = field(default=None, repr=False, compare=False)

    def delta_dict(self) -> dict[str, torch.Tensor] | None:
        """The merged delta per target of a merge given as deltas: the held ones, or recomputed by `rebuild` (not
        kept: the caller's copy is freed when it is done with it); None for a merge given as coefficients."""
        if self.deltas is not None:
            return self.deltas
        return None if self.rebuild is None else self.rebuild()

    def score(self, problem: MergeProblem) -> torch.Tensor:
        """Per-task scores ``(K,)`` of this merge on another problem over the same experts (e.g. the test split;
        a merge in a search space is scored on problems of that space)."""
        if self.coefficients is None:
            return problem.evaluate_deltas(self.delta_dict())
        if self.space is None:
            return problem.evaluate_linear(self.coefficients.unsqueeze(0))[0]
        if problem.space.to_dict() != self.space.to_dict():
            raise ValueError(f"{self.name} is a merge in the {self.space.kind} space; this problem searches the "
                             f"{problem.space.kind} space")
        return problem.evaluate_per_task(self.coefficients.unsqueeze(0))[0]

    @property
    def dense(self) -> bool:
        """Whether the merge is a dense delta per layer (TIES/DARE, or a candidate of an operator space)."""
        return self.coefficients is None or (self.space is not None and self.space.kind == "operator")

    def layer_coefficients(self) -> torch.Tensor:
        """What the in-place merger and the adapter writer take: ``(N,)``, or ``(L, N)`` for a merge in a layer
        space."""
        if self.dense:
            raise ValueError(f"{self.name} is a dense merge (deltas), not coefficients")
        return self.coefficients if self.space is None else self.space.layer_coefficients(self.coefficients)

    def merged_deltas(self, layers: dict) -> dict[str, torch.Tensor]:
        """The merge's dense delta per target (`layers`: the experts' ``targets``, `LayerFactors` or dense
        `DenseTarget` by name, in order)."""
        if self.coefficients is None:
            return self.delta_dict()
        if self.dense:
            return self.space.deltas(self.coefficients, layers)
        coefficients = self.layer_coefficients()
        return {name: target_delta(layer, coefficients[i] if coefficients.ndim == 2 else coefficients)
                for i, (name, layer) in enumerate(layers.items())}


def on_grid_edge(value: float, grid: Sequence[float]) -> bool:
    """Whether a tuned `value` is the smallest or the largest of its `grid` (more than one point): the best value
    may lie beyond it, so the tuning is recorded as such (``settings["on_grid_edge"]``, counted by a sweep)."""
    return len(grid) > 1 and value in (min(grid), max(grid))
