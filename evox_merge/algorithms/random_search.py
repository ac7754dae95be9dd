"""Uniform random search over the coefficient box: the baseline every other algorithm must beat."""

from __future__ import annotations

import math
from typing import Any

import torch
from evox.core import Algorithm, Mutable

from .common import coefficient_bounds, initial_points, rank_key

__all__ = ["RandomSearch"]


class RandomSearch(Algorithm):
    """Each step evaluates `pop_size` independent uniform draws from [lb, ub]^N and keeps the best one seen.

    Same constructor shape and budget convention as `EvoGM` (one step = one generation of P evaluations;
    `init_step` is a step), so a random-search run with the same number of steps uses the same evaluations.
    NaN/inf fitness never becomes the best. Draws come from a private `torch.Generator` seeded with `seed`,
    checkpointed by `state_dict()` (via `get_extra_state`). Given ``initial`` starting points (the tuned static
    merges), the first step evaluates them in place of its first draws.
    """

    def __init__(
        self,
        num_experts: int,
        pop_size: int = 20,
        lb: float | torch.Tensor | None = None,
        ub: float | torch.Tensor | None = None,
        seed: int = 0,
        device: torch.device | None = None,
        initial: torch.Tensor | None = None,
    ):
        """
        Args:
            num_experts: N, the length of a coefficient vector.
            pop_size: P, draws per step. Default 20, EvoGM's.
            lb: lower bound, a float or an (N,) tensor. None: `limits.DEFAULT_LB`, the default box's.
            ub: upper bound, a float or an (N,) tensor. None: `limits.DEFAULT_UB`.
            seed: seed of the private `torch.Generator`.
            device: device of the state and of the populations handed to the problem.
            initial: (M, N) starting points, best first (`common.initial_points`): the first step evaluates the
                first min(M, pop_size) of them, repaired into the box, in place of its first draws.

        Raises:
            MergeInputError: bad bounds, or an initial that is not (M, N) finite numbers.
        """
        super().__init__()
        device = torch.get_default_device() if device is None else torch.device(device)
        self.num_experts = num_experts
        self.pop_size = pop_size
        self.lb, self.ub = coefficient_bounds(num_experts, lb, ub)
        self._rng = torch.Generator().manual_seed(seed)
        initial = initial_points(initial, num_experts)
        self.initial = None if initial is None else torch.clamp(initial[:pop_size], self.lb, self.ub)
        self._steps = 0  # steps taken (checkpointed): the first one evaluates `initial`
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
        if self.initial is not None and self._steps == 0:
            draws = torch.cat([self.initial, draws[len(self.initial):]])
        self._steps += 1
        self.pop = draws.to(self.pop.device)
        self.fit = self.evaluate(self.pop)
        key = rank_key(torch.cat([self.best_fitness[None], self.fit]))
        best = int(torch.argmin(key))
        if best > 0:
            self.best_coefficients = self.pop[best - 1].clone()
            self.best_fitness = self.fit[best - 1].clone()

    def get_extra_state(self) -> dict[str, Any]:
        """The RNG state and the steps taken, saved by `state_dict()`."""
        return {"rng": self._rng.get_state(), "steps": self._steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the state saved by `get_extra_state` (a checkpoint without ``steps`` was past its first step)."""
        self._rng.set_state(state["rng"])
        self._steps = int(state.get("steps", 1))
