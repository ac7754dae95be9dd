"""EvoGM's switches beyond the paper (arXiv 2605.29295), their presets, and the pure functions behind them.

`EvoGMSwitches` names every departure from the paper's Algorithm 1 that `EvoGM` can turn on; `VARIANTS` maps a
variant name to a preset (``"paper"``: all off, the faithful algorithm; ``"default"``: the best combination measured on
the synthetic landscapes, benchmarks/results/landscapes.md). Everything here is *ours*, not the paper's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

from evox_merge.util.errors import MergeInputError

from .limits import raise_for_arguments


# Fresh candidates tried around a cached one before falling back to a uniform draw (archive switch).
RESAMPLE_TRIES = 8

__all__ = [
    "VARIANTS",
    "EvoGMSwitches",
    "diverse_basis",
    "extrapolate_and_mutate",
    "is_cached",
    "replace_cached",
    "resolve_switches",
    "success_rule",
]


@dataclasses.dataclass(frozen=True)
class EvoGMSwitches:
    """The departures from the paper EvoGM can make (all *ours*); every field's "off" value is the paper's behaviour.

    Attributes:
        extrapolation: beta_max > 1 draws each candidate as x + beta (G_f(x) - x), beta ~ U(1, beta_max) per
            candidate, so the step to the winners can overshoot instead of landing on their mean. 0 is off
            (the paper's candidate G_f(x)).
        mutation: add sigma * L z to each candidate, z ~ N(0, I), L L^T the winners' covariance normalised to mean
            variance 1 (in the generators' [-1, 1] coordinates), sigma adapted by the 1/5 success rule.
        initial_sigma: sigma of the first generated population of a run (generators' coordinates, box width 2).
        archive: never evaluate a vector already scored (compared in the original expert basis, within
            `duplicate_tolerance`): a repeat is replaced by a fresh candidate, so a step still evaluates exactly P;
            and carry the previous round's best P vectors into the next round with their scores.
        duplicate_tolerance: L2 distance (original basis) under which a candidate counts as already scored; 0 means
            exact repeats only.
        task_arithmetic_scales: rows s * ones (task arithmetic with scale s) added to round 0's initial population,
            after the average and before the one-hots.
        newer_ties: equal fitness ranks the newer candidate first (winner split, selection, best); the paper's code
            keeps the first-found.
        guarded_shift: build the next basis greedily from the round's ranked vectors, skipping one that would push
            the basis's condition number over `max_condition`; with fewer than N such vectors, keep the basis.
        max_condition: the condition-number bound of `guarded_shift`.
    """

    extrapolation: float = 0.0
    mutation: bool = False
    initial_sigma: float = 0.3
    archive: bool = False
    duplicate_tolerance: float = 0.0
    task_arithmetic_scales: tuple[float, ...] = ()
    newer_ties: bool = False
    guarded_shift: bool = False
    max_condition: float = 100.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


VARIANTS: dict[str, EvoGMSwitches] = {
    "paper": EvoGMSwitches(),
    "default": EvoGMSwitches(
        extrapolation=3.0,
        mutation=True,
        archive=True,
        duplicate_tolerance=0.0,
        task_arithmetic_scales=(0.3, 0.6, 1.0),
        newer_ties=True,
        guarded_shift=True,
    ),
}


def resolve_switches(variant: str, overrides: dict[str, Any]) -> EvoGMSwitches:
    """The preset `variant` with the non-None `overrides` applied.

    Raises:
        MergeInputError: an unknown variant or an override outside its valid range.
    """
    if variant not in VARIANTS:
        raise MergeInputError(f"variant: expected one of {sorted(VARIANTS)}, got {variant!r}")
    changes = {name: value for name, value in overrides.items() if value is not None}
    raise_for_arguments("EvoGM", changes)  # the rules a search config is checked with (`limits`)
    if "task_arithmetic_scales" in changes:
        changes["task_arithmetic_scales"] = tuple(float(s) for s in changes["task_arithmetic_scales"])
    return dataclasses.replace(VARIANTS[variant], **changes)


def is_cached(candidates: torch.Tensor, archive: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(P,) bool: whether each candidate (P, N) lies within `tolerance` (L2) of a row of `archive` (A, N);
    tolerance 0 means an exact repeat."""
    if len(archive) == 0 or len(candidates) == 0:
        return torch.zeros(len(candidates), dtype=torch.bool)
    if tolerance == 0:
        return (candidates[:, None, :] == archive[None, :, :]).all(-1).any(-1)
    return (torch.cdist(candidates.double(), archive.double()) <= tolerance).any(-1)


def success_rule(sigma: float, success_rate: float, target: float = 0.2, damping: float = 1.0) -> float:
    """Rechenberg's 1/5 success rule, smoothed: sigma * exp((rate - target) / ((1 - target) * damping)),
    kept within [1e-3, 1]."""
    return min(max(sigma * math.exp((success_rate - target) / ((1 - target) * damping)), 1e-3), 1.0)


def mutation_factor(winners: torch.Tensor) -> torch.Tensor:
    """(N, N) lower-triangular L with L L^T the winners' (W, N) covariance scaled to mean variance 1, plus a 5%
    isotropic share so a collapsed winner set still explores every direction."""
    dim = winners.shape[1]
    if len(winners) < 2:
        return torch.eye(dim)
    centred = winners.double() - winners.double().mean(0)
    cov = centred.T @ centred / (len(winners) - 1)
    scale = float(torch.diagonal(cov).mean())
    if not math.isfinite(scale) or scale <= 1e-12:
        return torch.eye(dim)
    shape = 0.95 * cov / scale + 0.05 * torch.eye(dim, dtype=torch.float64)
    return torch.linalg.cholesky(shape).float()


def diverse_basis(vectors: torch.Tensor, order: torch.Tensor, size: int, max_condition: float) -> list[int] | None:
    """Greedy well-conditioned basis: walk `order` (indices into `vectors` (H, N), best first) and keep a vector
    when the kept rows' condition number stays <= `max_condition`; the first `size` kept, or None if fewer exist."""
    kept: list[int] = []
    for index in order.tolist():
        rows = vectors[kept + [index]].double()
        if not bool(torch.isfinite(rows).all()):
            continue
        singular = torch.linalg.svdvals(rows)
        if float(singular[-1]) > 0 and float(singular[0] / singular[-1]) <= max_condition:
            kept.append(index)
            if len(kept) == size:
                return kept
    return None


def extrapolate_and_mutate(
    parents: torch.Tensor,
    targets: torch.Tensor,
    winners: torch.Tensor,
    extrapolation: float,
    sigma: float,
    rng: torch.Generator,
) -> torch.Tensor:
    """The extrapolation and mutation switches on (P, N) parents x and generator outputs G_f(x) (box coordinates
    [-1, 1]): x + beta (G_f(x) - x), beta ~ U(1, extrapolation) per row (skipped when extrapolation is 0), plus
    sigma * L z with L = `mutation_factor(winners)` (skipped when sigma is 0). Draws from `rng`, betas first."""
    if extrapolation:
        beta = 1.0 + (extrapolation - 1.0) * torch.rand(len(parents), 1, generator=rng, device="cpu")
        targets = parents + beta * (targets - parents)
    if sigma:
        factor = mutation_factor(winners)
        noise = torch.randn(len(parents), parents.shape[1], generator=rng, device="cpu")
        targets = targets + sigma * noise @ factor.T
    return targets


def replace_cached(
    candidates: torch.Tensor,
    basis: torch.Tensor,
    archive: torch.Tensor,
    tolerance: float,
    lb: torch.Tensor,
    ub: torch.Tensor,
    step: torch.Tensor | None,
    rng: torch.Generator,
    repair: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(P, N) candidates (round basis) with every row whose original-basis vector (row @ basis) is within
    `tolerance` of `archive` (A, N) or of an earlier accepted row replaced: by up to RESAMPLE_TRIES Gaussian draws
    around it with per-coordinate std `step` (skipped when None), then uniform draws in [lb, ub] until one is new.
    A fresh row is put in the box by `repair` ((n, N) rows to rows; default: clipped to [lb, ub];
    `evox_merge.algorithms.evogm_basis.RoundBasis.repair` puts its original-basis vector in the box too)."""
    if repair is None:
        def repair(rows: torch.Tensor) -> torch.Tensor:
            return torch.clamp(rows, lb, ub)
    accepted: list[torch.Tensor] = []
    for row in candidates:
        tries = 0
        while bool(is_cached((row @ basis)[None], archive, tolerance)[0]):
            if step is not None and tries < RESAMPLE_TRIES:
                noise = torch.randn(len(row), generator=rng, device="cpu")
                row = repair((row + step * noise)[None])[0]
            else:
                row = repair((lb + (ub - lb) * torch.rand(len(row), generator=rng, device="cpu"))[None])[0]
            tries += 1
        accepted.append(row)
        archive = torch.cat([archive, (row @ basis)[None]])
    return torch.stack(accepted) if accepted else candidates
