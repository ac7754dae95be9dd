"""Uniform random search over the coefficient box: the baseline every other algorithm must beat."""

from __future__ import annotations

import math
from typing import Any

import torch
from evox.core import Algorithm, Mutable

from .common import coefficient_bounds, rank_key

__all__ = ["RandomSearch"]


class RandomSearch(Algorithm):
    """Each step evaluates `pop_size` independent uniform draws from [lb, ub]^N and keeps the best one seen.

    Same constructor shape and budget convention as `EvoGM` (one step = one generation of P evaluations;
    `init_step` is a step), so a random-search run with the same number of steps uses the same evaluations.
    NaN/inf fitness never becomes the best. Draws come from a private `torch.Generator` seeded with `seed`,
    checkpointed by `state_dict()` (via `get_extra_state`).
    """

    def __init__(
        self,
        num_experts: int,
        pop_size: int = 20,
        lb: float | torch.Tensor = -1.0,
        ub: float | torch.Tensor = 1.0,
        seed: int = 0,
        device: torch.device | None = None,
    ):
        """
        Args:
            num_experts: N, the length of a coefficient vector.
            pop_size: P, draws per step. Default 20, EvoGM's.
            lb: lower bound, a float or an (N,) tensor. Default -1.
            ub: upper bound, a float or an (N,) tensor. Default 1.
            seed: seed of the private `torch.Generator`.
            device: device of the state and of the populations handed to the problem.
        """
        super().__init__()
        device = torch.get_default_device() if device is None else torch.device(device)
        self.num_experts = num_experts
        self.pop_size = pop_size
        self.lb, self.ub = coefficient_bounds(num_experts, lb, ub)
        self._rng = torch.Generator().manual_seed(seed)
        self.pop = Mutable(torch.zeros(pop_size, num_experts, device=device))
        self.fit = Mutable(torch.full((pop_size,), torch.inf, device=device))
        self.best_coefficients = Mutable(torch.zeros(num_experts, device=device))
        self.best_fitness = Mutable(torch.tensor(torch.inf, device=device))

    def racing_threshold(self, lower_bounds: torch.Tensor) -> float:
        """Racing quota (`evox_merge.algorithms.common.RacingQuota`): none, only the run's best candidates matter."""
        return math.inf

    def step(self) -> None:
        """Evaluate P fresh uniform draws ((P, N) population, (P,) fitness) and update the best."""
        draws = torch.rand(self.pop_size, self.num_experts, generator=self._rng, device="cpu")
        draws = self.lb + (self.ub - self.lb) * draws
        self.pop = draws.to(self.pop.device)
        self.fit = self.evaluate(self.pop)
        key = rank_key(torch.cat([self.best_fitness[None], self.fit]))
        best = int(torch.argmin(key))
        if best > 0:
            self.best_coefficients = self.pop[best - 1].clone()
            self.best_fitness = self.fit[best - 1].clone()

    def get_extra_state(self) -> dict[str, Any]:
        """The RNG state, saved by `state_dict()`."""
        return {"rng": self._rng.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the RNG state saved by `get_extra_state`."""
        self._rng.set_state(state["rng"])
