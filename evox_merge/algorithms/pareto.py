"""Pareto helpers, under minimisation (the convention of every EvoX algorithm): dominance, non-dominated ranks,
crowding distance, the order EvoGM's multi-objective mode ranks by, a non-dominated archive and the exact
hypervolume.

Rows are points ``(n, M)``. A row with a NaN or infinite value is *invalid*: it dominates nothing, is dominated by
every valid row, ranks in the last front and never enters an archive. Callers that maximise (the run layer's
objectives, higher is better) negate first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "ParetoArchive", "crowding_distance", "dominates", "hypervolume", "non_dominated_rank", "pareto_order",
    "split_pareto_winners",
]


def _valid(points: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(points).all(dim=-1)


def dominates(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` dominates ``b`` (minimisation): no worse in every objective and better in one. Broadcasts over leading
    dimensions; an invalid ``a`` dominates nothing, a valid ``a`` dominates every invalid ``b``."""
    a, b = a.double(), b.double()
    plain = (a <= b).all(-1) & (a < b).any(-1)
    valid_a, valid_b = _valid(a), _valid(b)
    return valid_a & (~valid_b | plain)


def non_dominated_rank(points: torch.Tensor) -> torch.Tensor:
    """Front index of every row, 0 = non-dominated (fast non-dominated sort, O(M n^2)); invalid rows all share the
    front after the last valid one."""
    n = len(points)
    rank = torch.full((n,), -1, dtype=torch.int64)
    if n == 0:
        return rank
    matrix = dominates(points[:, None, :], points[None, :, :])  # [i, j]: i dominates j
    dominated_by = matrix.sum(0)
    remaining = torch.ones(n, dtype=torch.bool)
    front = 0
    while remaining.any():
        current = remaining & (dominated_by == 0)
        if not current.any():  # cannot happen for a strict partial order; guard against float oddities
            current = remaining.clone()
        rank[current] = front
        remaining &= ~current
        dominated_by -= matrix[current].sum(0)
        front += 1
    return rank


def crowding_distance(points: torch.Tensor) -> torch.Tensor:
    """NSGA-II crowding distance of the rows of one front ``(n, M)``: per objective, the gap between a row's two
    neighbours over the objective's range, summed; the extremes (and every row of a front of at most 2) get inf.
    An objective with zero range adds nothing. Invalid rows get 0."""
    n, m = points.shape
    distance = torch.zeros(n, dtype=torch.float64)
    valid = _valid(points)
    index = torch.nonzero(valid).squeeze(1)
    if len(index) <= 2:
        distance[index] = torch.inf
        return distance
    values = points[index].double()
    for k in range(m):
        order = torch.argsort(values[:, k], stable=True)
        column = values[order, k]
        span = column[-1] - column[0]
        distance[index[order[0]]] = torch.inf
        distance[index[order[-1]]] = torch.inf
        if span > 0:
            distance[index[order[1:-1]]] += (column[2:] - column[:-2]) / span
    return distance


def pareto_order(points: torch.Tensor, newer_first: bool = False) -> torch.Tensor:
    """Indices sorting the rows best first: by non-dominated rank, then by crowding distance within the front
    (larger first), then by evaluation order (older first, or newer with `newer_first`); invalid rows last."""
    n = len(points)
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    rank = non_dominated_rank(points)
    crowding = torch.zeros(n, dtype=torch.float64)
    for front in rank.unique():
        members = torch.nonzero(rank == front).squeeze(1)
        crowding[members] = crowding_distance(points[members])
    position = torch.arange(n, dtype=torch.float64)
    tie = -position if newer_first else position
    keys = sorted(range(n), key=lambda i: (int(rank[i]), -float(crowding[i]), float(tie[i])))
    return torch.tensor(keys, dtype=torch.int64)


def split_pareto_winners(points: torch.Tensor, winner_ratio: float,
                         newer_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`evox_merge.algorithms.common.split_winners_losers` for objective vectors ``(H, M)``: H+ is the first
    floor(rho * H) (at least one) valid rows of `pareto_order`, H- the rest."""
    order = pareto_order(points, newer_first)
    num_valid = int(_valid(points).sum())
    num_winners = min(max(1, int(len(points) * winner_ratio)), num_valid)
    return order[:num_winners], order[num_winners:]


def hypervolume(points: torch.Tensor, reference: torch.Tensor) -> float:
    """The exact hypervolume (minimisation) dominated by `points` ``(n, M)`` and bounded by `reference` ``(M,)``:
    the measure of ``{x : some point <= x <= reference}``. Rows that do not lie strictly below the reference in every
    objective add nothing (they are clipped away), invalid rows too.

    Exact by slicing (HSO): sort by the last objective, and sum slab height times the (M-1)-dimensional hypervolume of
    the points below each slab; the 1-D case is a length. Fast for the 2 and 3 objectives it is meant for (O(n^2 log n)
    for 3), exponential in M beyond that.
    """
    reference = reference.double()
    points = points.double()
    if len(points):
        points = points[_valid(points) & (points < reference).all(-1)]
    if len(points) == 0:
        return 0.0
    return _hso(points, reference)


def _hso(points: torch.Tensor, reference: torch.Tensor) -> float:
    m = points.shape[1]
    if m == 1:
        return float(reference[0] - points[:, 0].min())
    if m == 2:  # sweep: sort by the first objective, keep the staircase
        order = torch.argsort(points[:, 0], stable=True)
        volume, best_second = 0.0, float(reference[1])
        for x, y in points[order].tolist():
            if y < best_second:
                volume += (float(reference[0]) - x) * (best_second - y)
                best_second = y
        return volume
    order = torch.argsort(points[:, -1], stable=True)
    points = points[order]
    volume = 0.0
    for i in range(len(points)):
        upper = float(reference[-1]) if i == len(points) - 1 else float(points[i + 1, -1])
        height = upper - float(points[i, -1])
        if height > 0:
            volume += height * _hso(points[: i + 1, :-1], reference[:-1])
    return volume


@dataclass
class ParetoArchive:
    """The non-dominated points seen so far (minimisation), each with its id (e.g. a record id).

    `update` adds a batch: a new point enters unless an archived point dominates it or equals it (the earlier one is
    kept), and evicts the archived points it dominates. Invalid points never enter.
    """

    ids: list[Any] = field(default_factory=list)
    points: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0, dtype=torch.float64))

    def update(self, ids: list[Any], points: torch.Tensor) -> list[Any]:
        """Add the rows of `points` ``(n, M)`` with their `ids`; returns the ids that entered (and stayed)."""
        points = points.double()
        if self.points.numel() == 0:
            self.points = torch.empty(0, points.shape[1], dtype=torch.float64)
        entered = []
        for identifier, point in zip(ids, points):
            if not bool(torch.isfinite(point).all()):
                continue
            if len(self.points) and bool((dominates(self.points, point) | (self.points == point).all(-1)).any()):
                continue
            keep = ~dominates(point, self.points) if len(self.points) else torch.ones(0, dtype=torch.bool)
            self.points = torch.cat([self.points[keep], point[None]])
            kept_ids = [i for i, k in zip(self.ids, keep.tolist()) if k]
            entered = [i for i in entered if i in kept_ids]
            self.ids = kept_ids + [identifier]
            entered.append(identifier)
        return entered

    def __len__(self) -> int:
        return len(self.ids)
