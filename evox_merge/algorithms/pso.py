"""PSO on the coefficient box: EvoX's `PSO` with its velocity clamp fixed, a seed and EvoGM's initial population."""

from __future__ import annotations

from typing import Any, Literal

import torch
from evox.algorithms import PSO
from evox.algorithms.so.pso_variants.utils import min_by

from .common import coefficient_bounds, hybrid_population, initial_points, rank_key
from .limits import raise_for_arguments

__all__ = ["BoundedPSO"]


class BoundedPSO(PSO):
    """Particle swarm optimisation (Kennedy and Eberhart, 1995) on merge coefficients.

    A subclass of EvoX 1.4.0's `PSO` that:

    * clamps velocities to [-(ub - lb), +(ub - lb)] instead of to [lb, ub] (upstream's clamp freezes the swarm when
      lb = 0, since velocities can then never be negative; docs/evox.md), and moves particles with the clamped
      velocity; positions are clipped to the box, as upstream;
    * starts, by default, from EvoGM's hybrid initial population (average, one-hots, uniform random), so both
      algorithms search from the same points; `init="uniform"` gives upstream's uniform swarm; ``initial``
      starting points (the tuned static merges) are the swarm's first particles in either case;
    * draws all randomness from a private `torch.Generator` seeded with `seed` (the parent constructor's draws are
      discarded and do not disturb torch's global RNG), checkpointed by `state_dict()`;
    * ranks NaN/inf fitness last (`fit` holds the fitness with those replaced by +inf), so they never become a
      personal or global best;
    * keeps every buffer a distinct tensor: upstream's `pop`, `local_best_location` and `global_best_location`
      share storage, so `load_state_dict` into upstream's PSO overwrites one with another and a resumed run differs.

    `init_step` evaluates the initial swarm; each step is one generation of `pop_size` evaluations.
    """

    def __init__(
        self,
        num_experts: int,
        pop_size: int = 20,
        lb: float | torch.Tensor | None = None,
        ub: float | torch.Tensor | None = None,
        seed: int = 0,
        w: float = 0.6,
        phi_p: float = 2.5,
        phi_g: float = 0.8,
        init: Literal["hybrid", "uniform"] = "hybrid",
        device: torch.device | None = None,
        space: Any = None,
        initial: torch.Tensor | None = None,
    ):
        """
        Args:
            num_experts: N, the length of a coefficient vector.
            pop_size: number of particles. Default 20, EvoGM's.
            lb: lower bound, a float or an (N,) tensor. None: `limits.DEFAULT_LB`, the default box's.
            ub: upper bound, a float or an (N,) tensor. None: `limits.DEFAULT_UB`.
            seed: seed of the private `torch.Generator`.
            w: inertia weight (EvoX's default 0.6).
            phi_p: cognitive (personal-best) weight (EvoX's default 2.5).
            phi_g: social (global-best) weight (EvoX's default 0.8).
            init: "hybrid" (EvoGM's initial population) or "uniform" (uniform in the box).
            device: device of the state and of the populations handed to the problem.
            space: the search space (`evox_merge.experts.spaces`) when it is not one coefficient per expert
                (``num_experts`` is then its dimension): the hybrid swarm's structured rows are written in it.
            initial: (M, N) starting points, best first (`common.initial_points`): the swarm's first particles
                (the first min(M, pop_size), repaired into the box), before the hybrid or uniform ones.

        Raises:
            MergeInputError: non-finite w, phi_p or phi_g, an init other than "hybrid"/"uniform", an initial that is
                not (M, N) finite numbers, or bad bounds.
        """
        raise_for_arguments("BoundedPSO", {"w": w, "phi_p": phi_p, "phi_g": phi_g, "init": init})
        device = torch.get_default_device() if device is None else torch.device(device)
        lower, upper = coefficient_bounds(num_experts, lb, ub)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            super().__init__(pop_size, lower.to(device), upper.to(device), w=w, phi_p=phi_p, phi_g=phi_g, device=device)
        self._rng = torch.Generator().manual_seed(seed)
        width = upper - lower
        initial = initial_points(initial, num_experts)
        if init == "hybrid":
            pop = hybrid_population(num_experts, pop_size, lower, upper, self._rng, space=space, initial=initial)
        else:
            pop = lower + width * torch.rand(pop_size, num_experts, generator=self._rng, device="cpu")
            if initial is not None:
                starts = torch.clamp(initial[:pop_size], lower, upper)
                pop = torch.cat([starts, pop[len(starts):]])
        velocity = width * (2 * torch.rand(pop_size, num_experts, generator=self._rng, device="cpu") - 1)
        # Buffers, not plain tensors, so `StdWorkflow(device=...)` moves them with the rest of the state.
        for name in ("lb", "ub"):
            self.register_buffer(name, self.__dict__.pop(name), persistent=False)
        self.register_buffer("v_max", width[None, :].to(device), persistent=False)
        self.pop = pop.to(device)
        self.velocity = velocity.to(device)
        # Clones: buffers that alias each other would corrupt one another in `load_state_dict`.
        self.local_best_location = self.pop.clone()
        self.global_best_location = self.pop[0].clone()

    def init_step(self) -> None:
        """Evaluate the initial swarm and set personal and global bests."""
        self.fit = rank_key(self.evaluate(self.pop))
        self.local_best_location = self.pop.clone()
        self.local_best_fit = self.fit.clone()
        self.global_best_location, self.global_best_fit = min_by([self.pop], [self.fit])

    def step(self) -> None:
        """Update bests from the last evaluation, move the swarm, evaluate it ((P, N) pop, (P,) fit)."""
        improved = self.fit < self.local_best_fit
        self.local_best_location = torch.where(improved[:, None], self.pop, self.local_best_location)
        self.local_best_fit = torch.where(improved, self.fit, self.local_best_fit)
        self.global_best_location, self.global_best_fit = min_by(
            [self.global_best_location[None], self.pop], [self.global_best_fit[None], self.fit]
        )
        r_g = torch.rand(self.pop_size, self.dim, generator=self._rng, device="cpu").to(self.pop.device)
        r_p = torch.rand(self.pop_size, self.dim, generator=self._rng, device="cpu").to(self.pop.device)
        velocity = (
            self.w * self.velocity
            + self.phi_p * r_p * (self.local_best_location - self.pop)
            + self.phi_g * r_g * (self.global_best_location - self.pop)
        )
        self.velocity = torch.clamp(velocity, -self.v_max, self.v_max)
        self.pop = torch.clamp(self.pop + self.velocity, self.lb, self.ub)
        self.fit = rank_key(self.evaluate(self.pop))

    def get_extra_state(self) -> dict[str, Any]:
        """The RNG state, saved by `state_dict()`."""
        return {"rng": self._rng.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the RNG state saved by `get_extra_state`."""
        self._rng.set_state(state["rng"])
