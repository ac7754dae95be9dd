"""Helpers every evox-merge algorithm shares: the coefficient box, EvoGM's hybrid initial population, ranking
that puts failed evaluations last, winner/loser splits, and the protocol through which an algorithm tells the run
layer about its candidates and its search (for records.jsonl and recipe.json).

The protocol (both methods optional; the run layer checks with ``isinstance``):

- ``candidate_annotations() -> dict``: called by the run loop after every step, per-candidate annotations of the
  population evaluated in that step (a list with one entry per candidate, or one value for all), copied into each
  record of records.jsonl (e.g. EvoGM's round, iteration and basis). `CandidateAnnotations` is its protocol.
- ``recipe_facts() -> dict``: JSON-serialisable facts about the finished search for recipe.json (e.g. EvoGM's
  round bases). `RecipeFacts` is its protocol.

EvoX's own ``record_step`` hook is left to EvoX monitors (it must return tensors only).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch

from evox_merge.util.errors import MergeInputError

from .limits import DEFAULT_LB, DEFAULT_UB


@runtime_checkable
class CandidateAnnotations(Protocol):
    """An algorithm that annotates the candidates it just had evaluated."""

    def candidate_annotations(self) -> dict[str, Any]:
        """Per-candidate annotations (lists of length P) or shared values, JSON-serialisable."""
        ...


@runtime_checkable
class RacingQuota(Protocol):
    """An algorithm that says which candidates of a population it will use, so that racing
    (`evox_merge.problems.racing`) may stop scoring the rest once they confidently cannot be among them."""

    def racing_threshold(self, lower_bounds: torch.Tensor) -> float:
        """Given the population's fitness lower bounds ``(P,)`` (higher is better, the problem's scale), the
        fitness a candidate must be able to reach to be used (+inf: only the run's best candidates matter)."""
        ...


@runtime_checkable
class RecipeFacts(Protocol):
    """An algorithm that reports facts about its finished search for recipe.json."""

    def recipe_facts(self) -> dict[str, Any]:
        """JSON-serialisable facts (lists, numbers, strings) about the search so far."""
        ...


def coefficient_bounds(
    num_experts: int, lb: float | torch.Tensor | None, ub: float | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The coefficient box as two (N,) float32 CPU tensors, from scalars or (N,) tensors; None is the default box's
    bound (`evox_merge.algorithms.limits.DEFAULT_LB` / ``DEFAULT_UB``, its one home).

    Raises:
        MergeInputError: a bound of the wrong shape, a non-finite bound, or lb >= ub in some coordinate.
    """
    bounds = []
    for name, value in (("lb", DEFAULT_LB if lb is None else lb), ("ub", DEFAULT_UB if ub is None else ub)):
        tensor = torch.as_tensor(value, dtype=torch.float32, device="cpu").detach()
        if tensor.ndim == 0:
            tensor = tensor.expand(num_experts)
        if tensor.shape != (num_experts,):
            raise MergeInputError(
                f"{name}: expected a float or a tensor of shape ({num_experts},), got {tuple(tensor.shape)}"
            )
        bounds.append(tensor.clone())
    lower, upper = bounds
    if not bool(torch.isfinite(lower).all() and torch.isfinite(upper).all()):
        raise MergeInputError(f"lb/ub: expected finite bounds, got lb={lower.tolist()} ub={upper.tolist()}")
    if not bool((lower < upper).all()):
        raise MergeInputError(
            f"lb/ub: expected lb < ub in every coordinate, got lb={lower.tolist()} ub={upper.tolist()}"
        )
    return lower, upper


def initial_points(initial: Any, dim: int) -> torch.Tensor | None:
    """The ``initial`` constructor argument every registered algorithm takes, checked: ``(M, D)`` float32 on CPU
    (a single ``(D,)`` point becomes one row), or None. The rows are points in the search's coordinates, best first
    (`evox_merge.run.registry.build_algorithm`: the tuned linear static merges); each algorithm repairs them into
    its box and evaluates them in its first generation.

    Raises:
        MergeInputError: not a (M, D) array of finite numbers with M >= 1.
    """
    if initial is None:
        return None
    points = torch.as_tensor(initial, dtype=torch.float32).detach().to("cpu")
    if points.ndim == 1:
        points = points[None]
    if points.ndim != 2 or points.shape[1] != dim or len(points) == 0 or not bool(torch.isfinite(points).all()):
        raise MergeInputError(f"initial: expected an (M, {dim}) array of finite numbers (M >= 1 starting points, one "
                              f"coordinate per search dimension), got shape {tuple(points.shape)}")
    return points.clone()


def unique_rows(rows: torch.Tensor) -> torch.Tensor:
    """`rows` without exact repeats of an earlier row, order kept."""
    keep = [i for i in range(len(rows)) if not any(torch.equal(rows[i], rows[j]) for j in range(i))]
    return rows[keep]


def hybrid_population(
    num_experts: int,
    pop_size: int,
    lb: torch.Tensor,
    ub: torch.Tensor,
    rng: torch.Generator,
    task_arithmetic_scales: tuple[float, ...] = (),
    space: Any = None,
    initial: torch.Tensor | None = None,
) -> torch.Tensor:
    """EvoGM's initial population (arXiv 2605.29295, "Population Initialization"), (P, N) float32 on CPU.

    Rows: the uniform average (1/N each), the N one-hot vectors, then uniform random draws in [lb, ub]; truncated to P
    rows and clipped into the box. The average comes first *(ours; the authors' code puts the one-hots first)*, so a
    population smaller than N + 1 keeps the average merge, the strongest static baseline, and drops a one-hot.
    `task_arithmetic_scales` *(ours)* adds a row s * ones (task arithmetic with scale s) per scale after the average.
    `initial` *(ours)*: ``(M, N)`` starting points (`initial_points`, e.g. the tuned static merges) put before
    everything else. A row that repeats an earlier one exactly (the soup is the average, the best single expert a
    one-hot) is dropped, and random draws fill its place.

    With a search `space` (`evox_merge.experts.spaces`; ``num_experts`` is then the space's dimension D) the average,
    the task-arithmetic rows and the one-hots are the same *merges* written in the space's coordinates
    (``space.from_expert``), one per expert of the space; only the random rows are drawn in the space itself;
    `initial` is already in the space's coordinates.
    """
    experts = len(space.expert_names) if space is not None else num_experts
    average = torch.full((1, experts), 1.0 / experts, device="cpu")
    scaled = torch.tensor([[float(s)] * experts for s in task_arithmetic_scales], device="cpu").reshape(-1, experts)
    structured = torch.cat([average, scaled, torch.eye(experts, device="cpu")])
    if space is not None:
        structured = space.from_expert(structured).float()
    if initial is not None:
        structured = torch.cat([initial.float(), structured])
    structured = unique_rows(torch.clamp(structured, lb, ub))
    num_random = max(pop_size - len(structured), 0)
    random = lb + (ub - lb) * torch.rand(num_random, num_experts, generator=rng, device="cpu")
    return torch.clamp(torch.cat([structured, random])[:pop_size], lb, ub)


def expert_average(num_experts: int, space: Any = None) -> torch.Tensor:
    """The uniform average merge (1/N per expert) as a ``(num_experts,)`` vector, or in a search `space`'s
    coordinates (``space.from_expert``; ``num_experts`` is then the space's dimension): where CMA-ES starts."""
    if space is None:
        return torch.full((num_experts,), 1.0 / num_experts, device="cpu")
    experts = len(space.expert_names)
    return space.from_expert(torch.full((experts,), 1.0 / experts, device="cpu")).float()


def rank_key(fitness: torch.Tensor) -> torch.Tensor:
    """Fitness for ranking under minimisation: NaN and +-inf become +inf, so a failed evaluation always ranks last."""
    return torch.where(torch.isfinite(fitness), fitness, torch.inf)


def rank_order(fitness: torch.Tensor, newer_first: bool = False) -> torch.Tensor:
    """Indices sorting (H,) `fitness` best first under minimisation, NaN/inf last. Ties keep the older (earlier)
    entry first, or with `newer_first` *(ours, EvoGM's ``newer_ties`` switch)* the newer one."""
    if not newer_first:
        return torch.argsort(rank_key(fitness), stable=True)
    return len(fitness) - 1 - torch.argsort(rank_key(fitness.flip(0)), stable=True)


def split_winners_losers(
    fitness: torch.Tensor, winner_ratio: float, newer_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the winner set H+ and loser set H- of a history (arXiv 2605.29295, "Winner-Loser Pairing").

    H+ is the best floor(rho * |H|) entries (at least one, as in the authors' code) among those with finite fitness;
    a NaN or infinite fitness never becomes a winner. H- is everything else. Ties keep evaluation order, or prefer
    the newer entry with `newer_first`.

    Args:
        fitness: (H,) fitness under minimisation, in evaluation order.
        winner_ratio: rho in (0, 1).
        newer_first: break ties towards later entries *(ours)*.

    Returns:
        (winner_idx, loser_idx), int64 tensors; winner_idx is empty when no fitness is finite.
    """
    order = rank_order(fitness, newer_first)
    num_finite = int(torch.isfinite(fitness).sum())
    num_winners = min(max(1, int(len(fitness) * winner_ratio)), num_finite)
    return order[:num_winners], order[num_winners:]


def kth_best(values: torch.Tensor, k: int) -> float:
    """The k-th largest of `values` (-inf when there are fewer than k; +inf for k < 1: nothing reaches it)."""
    if k < 1:
        return math.inf
    if values.numel() < k:
        return -math.inf
    return float(torch.sort(values.double().nan_to_num(nan=-math.inf), descending=True).values[k - 1])
