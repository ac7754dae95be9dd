"""What the two particle swarms from the merging literature share (`PSOMerging`, arXiv 2508.19839, and
`ModelSwarms`, arXiv 2410.11163): particles in the coefficient box, their velocities, personal and global bests,
a private seeded generator, and a checkpoint that resumes a run bit for bit.

Both papers move whole models in weight space; here a particle is a point of the search space (one coefficient per
expert, or per expert and layer group: `evox_merge.experts.spaces`), so a particle's model is the merge its
coordinates describe, and every move is a move of merge coefficients.
"""

from __future__ import annotations

from typing import Any

import torch
from evox.core import Algorithm, Mutable

from .common import coefficient_bounds, initial_points, rank_key, unique_rows

__all__ = ["ParticleSwarm", "in_space", "starting_particles"]


def in_space(rows: torch.Tensor, space: Any = None) -> torch.Tensor:
    """Expert-space rows ``(M, N)`` written in a search `space`'s coordinates (``space.from_expert``), float32 on
    the CPU; unchanged without a space (the expert space)."""
    return rows.float() if space is None else space.from_expert(rows).float()


def starting_particles(initial: torch.Tensor | None, structured: torch.Tensor, lb: torch.Tensor, ub: torch.Tensor,
                       pop_size: int) -> torch.Tensor:
    """The swarm's first particles: the `initial` starting points (best first), then the method's own `structured`
    rows, clipped into the box, exact repeats of an earlier row dropped (the best single expert is a one-hot, the
    base the zero vector), at most `pop_size` of them. The caller fills the rest of the swarm."""
    rows = structured if initial is None else torch.cat([initial.float(), structured.float()])
    return unique_rows(torch.clamp(rows, lb, ub))[:pop_size]


class ParticleSwarm(Algorithm):
    """A swarm of ``pop_size`` particles in the box [lb, ub]^D that minimises (run it with ``opt_direction="max"``).

    State (all of it in ``state_dict()``, so a resumed run continues bit-identically): positions ``pop``,
    ``velocity``, the last fitness ``fit``, personal bests ``local_best_location`` / ``local_best_fit``, the global
    best ``global_best_location`` / ``global_best_fit``, and the private `torch.Generator`'s state (seeded with
    ``seed``; the global RNG is never used). A NaN or infinite fitness ranks last (`common.rank_key`): it never
    becomes a personal or global best. `init_step` evaluates the first swarm; every `step` moves the swarm
    (`move`, the subclass's update rule) and evaluates it: one generation of ``pop_size`` evaluations.
    """

    def __init__(self, num_experts: int, pop_size: int, lb: float | torch.Tensor | None,
                 ub: float | torch.Tensor | None, seed: int, device: torch.device | None, initial: Any):
        """Check the box and the starting points and seed the generator; the subclass then calls `set_swarm`.

        Raises:
            MergeInputError: bad bounds, or an initial that is not (M, num_experts) finite numbers.
        """
        super().__init__()
        self._device = torch.get_default_device() if device is None else torch.device(device)
        self.dim = num_experts
        self.pop_size = pop_size
        lower, upper = coefficient_bounds(num_experts, lb, ub)
        self.register_buffer("lb", lower.to(self._device), persistent=False)
        self.register_buffer("ub", upper.to(self._device), persistent=False)
        self.initial = initial_points(initial, num_experts)
        self._rng = torch.Generator().manual_seed(seed)

    def uniform(self, *shape: int) -> torch.Tensor:
        """U(0, 1) draws from the private generator (on the CPU, so a seed gives the same draws on every device)."""
        return torch.rand(*shape, generator=self._rng, device="cpu")

    def set_swarm(self, pop: torch.Tensor, velocity: torch.Tensor) -> None:
        """The first positions ``(P, D)`` and velocities ``(P, D)`` (CPU tensors), as mutable state."""
        self.pop = Mutable(pop.float().to(self._device))
        self.velocity = Mutable(velocity.float().to(self._device))
        self.fit = Mutable(torch.full((self.pop_size,), torch.inf, device=self._device))
        # Clones: buffers that alias each other would corrupt one another in `load_state_dict`.
        self.local_best_location = Mutable(self.pop.clone())
        self.local_best_fit = Mutable(torch.full((self.pop_size,), torch.inf, device=self._device))
        self.global_best_location = Mutable(self.pop[0].clone())
        self.global_best_fit = Mutable(torch.tensor(torch.inf, device=self._device))

    def init_step(self) -> None:
        """Evaluate the first swarm and set the personal and global bests."""
        self.fit = rank_key(self.evaluate(self.pop))
        self.after_evaluation(self.update_bests(), first=True)

    def step(self) -> None:
        """Move the swarm (`move`, which keeps it in the box), evaluate it and update the bests."""
        self.move()
        self.fit = rank_key(self.evaluate(self.pop))
        self.after_evaluation(self.update_bests(), first=False)

    def move(self) -> None:
        """The update rule: new ``velocity`` and ``pop`` from the current state (the subclass's)."""
        raise NotImplementedError

    def after_evaluation(self, improved: torch.Tensor, first: bool) -> None:
        """A subclass's bookkeeping after each evaluation (`improved`: the particles with a new personal best;
        `first`: the first swarm's); nothing by default."""

    def update_bests(self) -> torch.Tensor:
        """Personal bests from the last evaluation (a strict improvement replaces one), then the global best (the
        first of equal bests); returns the (P,) mask of particles whose personal best improved."""
        improved = self.fit < self.local_best_fit
        self.local_best_location = torch.where(improved[:, None], self.pop, self.local_best_location)
        self.local_best_fit = torch.where(improved, self.fit, self.local_best_fit)
        best = int(torch.argmin(self.fit))
        if bool(self.fit[best] < self.global_best_fit):
            self.global_best_location = self.pop[best].clone()
            self.global_best_fit = self.fit[best].clone()
        return improved

    def get_extra_state(self) -> dict[str, Any]:
        """The generator's state, saved by `state_dict()`."""
        return {"rng": self._rng.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the state saved by `get_extra_state`."""
        self._rng.set_state(state["rng"])
