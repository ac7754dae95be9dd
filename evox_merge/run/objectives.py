"""What a search optimises: the normalised mean (``objectives: mean``) or a vector of objectives (``pareto``).

An objective is the weighted mean (task ``weight``s, renormalised within the group) of the *normalised* scores of a
group of tasks (`evox_merge.problems.normalisation`: 0 = base, 1 = best single expert on that task), so an NLL and an
accuracy share one front. ``pareto`` alone is one objective per task. Objective values are higher-is-better like the
fitness; `Objectives.fitness` is the ``(P, M)`` matrix a multi-objective algorithm gets (before the workflow's
negation), with NaN as `INVALID_OBJECTIVE`, a finite value far below any score (EvoX's crowding distances and
reference points turn an infinite one into NaN).

The config side (`evox_merge.run.config.ObjectivesConfig`) is checked without torch; this module does the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from evox_merge.algorithms.pareto import ParetoArchive, hypervolume
from evox_merge.run.config import objective_names

INVALID_OBJECTIVE = -1e6
# The hypervolume reference point, per objective in normalised units: as far below the base model as the best single
# expert is above it. The same point for every run, so hypervolumes compare across runs and algorithms.
HV_REFERENCE = -1.0


@dataclass(frozen=True)
class Objectives:
    """The objectives of a search.

    Attributes:
        kind: ``mean`` (one objective, today's fitness) or ``pareto``.
        names: one name per objective (the task name, or the group's task names joined by ``+``).
        groups: the tasks of each objective.
        challengers: how many challengers the release holds (pareto only).
    """

    kind: str
    names: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    challengers: int = 3

    @property
    def pareto(self) -> bool:
        return self.kind == "pareto"

    def weights(self, problem: Any) -> torch.Tensor:
        """``(M, K)``: row m holds the task weights of group m (renormalised to sum 1), 0 elsewhere."""
        rows = []
        for group in self.groups:
            mask = torch.tensor([name in group for name in problem.task_names], dtype=torch.float64)
            row = problem.task_weights * mask
            if row.sum() <= 0:  # every task of the group has weight 0: an unweighted mean of the group
                row = mask
            rows.append(row / row.sum())
        return torch.stack(rows)

    def values(self, problem: Any, task_scores: torch.Tensor) -> torch.Tensor:
        """Raw per-task scores ``(P, K)`` -> objective values ``(P, M)`` float64, higher is better, NaN kept."""
        normalised = problem.normalisation.apply(task_scores.reshape(-1, len(problem.task_names)))
        weights = self.weights(problem)[None]  # (1, M, K); a NaN outside a group must not reach its objective
        return torch.where(weights > 0, normalised[:, None, :] * weights, 0.0).sum(-1)

    def fitness(self, problem: Any, task_scores: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(P, M)`` fitness of a multi-objective algorithm: `values` with NaN as `INVALID_OBJECTIVE`."""
        fitness = self.values(problem, task_scores).nan_to_num(nan=INVALID_OBJECTIVE)
        if like is None:
            return fitness
        return fitness.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)

    def to_dict(self) -> dict[str, Any]:
        """For recipe.json and run.json."""
        return {"kind": self.kind, "names": list(self.names), "groups": [list(g) for g in self.groups],
                "formula": "per objective: weighted mean of the normalised scores of its tasks",
                "hypervolume_reference": HV_REFERENCE}


def objectives_from_config(value: Any, task_names: list[str]) -> Objectives:
    """`Objectives` from the config's ``objectives`` (``"mean"``, ``"pareto"`` or an `ObjectivesConfig`), already
    validated by `evox_merge.run.config.check_objectives`."""
    kind = value if isinstance(value, str) else value.kind
    groups = None if isinstance(value, str) else value.groups
    challengers = 3 if isinstance(value, str) else value.challengers
    if kind == "mean":
        return Objectives("mean", ("mean",), (tuple(task_names),), 0)
    names = tuple(objective_names(groups, task_names))
    groups = [[name] for name in task_names] if groups is None else groups
    return Objectives("pareto", names, tuple(tuple(g) for g in groups), challengers)


def objective_matrix(records: list[dict[str, Any]], names: tuple[str, ...] | list[str]) -> torch.Tensor:
    """``(R, M)`` objective values of records (NaN where a record has none or a NaN)."""
    rows = [[(r.get("objectives") or {}).get(n) for n in names] for r in records]
    return torch.tensor([[float("nan") if v is None else v for v in row] for row in rows], dtype=torch.float64
                        ).reshape(len(records), len(names))


def run_archive(records: list[dict[str, Any]], names: tuple[str, ...] | list[str]) -> ParetoArchive:
    """The non-dominated archive (higher is better) of a run's records, keyed by record id."""
    archive = ParetoArchive()
    archive.update([r["id"] for r in records], -objective_matrix(records, names))
    return archive


def hypervolume_by_generation(records: list[dict[str, Any]], names: tuple[str, ...] | list[str]) -> dict[int, float]:
    """The hypervolume (reference `HV_REFERENCE` in every objective) of the archive after each generation."""
    archive, volumes = ParetoArchive(), {}
    reference = torch.full((len(names),), -HV_REFERENCE, dtype=torch.float64)
    for generation in sorted({r["generation"] for r in records}):
        batch = [r for r in records if r["generation"] == generation]
        archive.update([r["id"] for r in batch], -objective_matrix(batch, names))
        volumes[generation] = hypervolume(archive.points, reference) if len(archive) else 0.0
    return volumes
