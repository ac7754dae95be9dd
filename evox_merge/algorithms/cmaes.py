"""CMA-ES on the coefficient box: EvoX's `CMAES` with its 1.4.0 bugs fixed, bounds, a seed, and a start at EvoGM's
reference point or at given starting points (the tuned static merges)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from evox.algorithms import CMAES
from evox.algorithms.so.es_variants.sort_utils import sort_by_key

from evox_merge.util.errors import MergeInputError

from .common import coefficient_bounds, expert_average, initial_points, kth_best, rank_key
from .limits import pop_size_problem, raise_for_arguments

__all__ = ["BoundedCMAES", "repair", "start_sigma"]

SIGMA_RANGE = (0.05, 0.25)
"""`start_sigma`'s bounds on the initial step size, as fractions of the mean box width (0.25: pycma's advice, a
quarter of the domain, and the step size without starting points)."""


def start_sigma(initial: torch.Tensor | None, lb: torch.Tensor, ub: torch.Tensor) -> float:
    """The initial step size from the spread of the starting points *(ours)*: the root mean square, over the other
    points and every coordinate, of their distance to the first (best) point, kept within `SIGMA_RANGE` times the
    mean box width; 0.25 times the mean box width with fewer than two points. A step of one sigma per coordinate
    then reaches the other starting points, so they are typical samples of the first generation's distribution."""
    width = float((ub - lb).mean())
    low, high = SIGMA_RANGE[0] * width, SIGMA_RANGE[1] * width
    if initial is None or len(initial) < 2:
        return high
    spread = float(((initial[1:].double() - initial[0].double()) ** 2).mean().sqrt())
    return min(max(spread, low), high)


def repair(x: torch.Tensor, lb: torch.Tensor, ub: torch.Tensor, mode: Literal["clip", "reflect"]) -> torch.Tensor:
    """Map points into the box [lb, ub]: project onto it ("clip") or mirror at its faces ("reflect").

    Args:
        x: (P, N) points.
        lb, ub: (N,) or broadcastable bounds.
        mode: "clip" puts an outside coordinate on the nearest face; "reflect" folds it back in (period 2 * width).
    """
    if mode == "clip":
        return torch.clamp(x, lb, ub)
    width = ub - lb
    folded = torch.remainder(x - lb, 2 * width)
    return lb + width - torch.abs(folded - width)


class BoundedCMAES(CMAES):
    """CMA-ES (Hansen, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772) on merge coefficients.

    A subclass of EvoX 1.4.0's `CMAES` that:

    * fixes its two bugs (docs/evox.md): `_conditional_decomposition` uses `torch.cond`, which fails on every step
      under torch 2.13, and is replaced by plain control flow; the rank-one covariance update `p_c @ p_c.T` on a 1-D
      tensor is a scalar, and is replaced by the outer product (upstream PR #251);
    * respects the box [lb, ub] (upstream has no bounds): every sampled point is repaired into the box before it is
      evaluated ("clip" by default, or "reflect"), and the distribution is updated with the repaired points, so the
      mean never leaves the box and the update always describes what was evaluated;
    * starts from EvoGM's reference point, the mean at the uniform average 1/N (clipped into the box), with
      sigma = 0.25 * mean box width by default (pycma's advice: about a quarter of the domain); or, given
      ``initial`` starting points (best first: the tuned static merges), with the mean at the first, sigma from
      their spread (`start_sigma`), and every starting point evaluated in the first generation in place of a sample
      (injected solutions, Hansen, arXiv:1110.4181; they are repaired into the box like any sample);
    * draws its samples from a private `torch.Generator` seeded with `seed`, checkpointed by `state_dict()`;
    * ranks NaN/inf fitness last.

    One step is one generation of `pop_size` evaluations; `init_step` is a step (as upstream).
    """

    def __init__(
        self,
        num_experts: int,
        pop_size: int = 20,
        lb: float | torch.Tensor | None = None,
        ub: float | torch.Tensor | None = None,
        seed: int = 0,
        sigma: float | None = None,
        mean_init: torch.Tensor | Sequence[float] | None = None,
        boundary: Literal["clip", "reflect"] = "clip",
        device: torch.device | None = None,
        space: Any = None,
        initial: torch.Tensor | None = None,
    ):
        """
        Args:
            num_experts: N, the length of a coefficient vector.
            pop_size: lambda, samples per generation. Default 20, EvoGM's (CMA-ES's own default would be
                4 + floor(3 ln N)).
            lb: lower bound, a float or an (N,) tensor. None: `limits.DEFAULT_LB`, the default box's.
            ub: upper bound, a float or an (N,) tensor. None: `limits.DEFAULT_UB`.
            seed: seed of the private `torch.Generator`.
            sigma: initial step size (> 0). Default 0.25 * mean(ub - lb), or from `initial`'s spread (`start_sigma`).
            mean_init: (N,) initial mean (a tensor or N finite numbers). Default `initial`'s first row, else the
                uniform average 1/N (in a search `space`'s coordinates where one is given: `expert_average`),
                clipped into the box.
            boundary: "clip" or "reflect", how samples outside the box are repaired.
            device: device of the state and of the populations handed to the problem.
            space: the search space (`evox_merge.experts.spaces`) when it is not one coefficient per expert
                (``num_experts`` is then its dimension); only the default mean depends on it.
            initial: (M, N) starting points, best first (`common.initial_points`): the first generation evaluates
                them (the first min(M, pop_size)) in place of its first samples.

        Raises:
            MergeInputError: pop_size below 2, sigma <= 0, a boundary other than "clip"/"reflect", a mean_init that
                is not N finite numbers, an initial that is not (M, N) finite numbers, or bad bounds (the rules of
                `evox_merge.algorithms.limits`).
        """
        problem = pop_size_problem("BoundedCMAES", pop_size)
        if problem:
            raise MergeInputError(problem)
        raise_for_arguments("BoundedCMAES", {"sigma": sigma, "boundary": boundary})
        device = torch.get_default_device() if device is None else torch.device(device)
        lower, upper = coefficient_bounds(num_experts, lb, ub)
        initial = initial_points(initial, num_experts)
        if initial is not None:
            initial = torch.clamp(initial[:pop_size], lower, upper)
        if mean_init is None:
            start = expert_average(num_experts, space) if initial is None else initial[0]
            mean_init = torch.clamp(start, lower, upper)
        else:
            mean_init = torch.as_tensor(mean_init, dtype=torch.float32)
            if mean_init.shape != (num_experts,) or not bool(torch.isfinite(mean_init).all()):
                raise MergeInputError(f"mean_init: expected {num_experts} finite numbers (one per search "
                                      f"dimension), got shape {tuple(mean_init.shape)}")
        if sigma is None:
            sigma = start_sigma(initial, lower, upper)
        super().__init__(mean_init=mean_init.to(device), sigma=sigma, pop_size=pop_size, device=device)
        # Buffers, not plain tensors, so `StdWorkflow(device=...)` moves them with the rest of the state.
        self.register_buffer("weights", self.__dict__.pop("weights"), persistent=False)
        self.register_buffer("lb", lower.to(device), persistent=False)
        self.register_buffer("ub", upper.to(device), persistent=False)
        self.boundary = boundary
        self._rng = torch.Generator().manual_seed(seed)
        self.initial = initial  # evaluated by the first step (iteration 1), a constant of the run like the bounds

    def racing_threshold(self, lower_bounds: torch.Tensor) -> float:
        """Racing quota (`evox_merge.algorithms.common.RacingQuota`): the mu-th best lower bound (the parents)."""
        return kth_best(lower_bounds, self.mu)

    def step(self) -> None:
        """Sample P points from N(mean, sigma^2 C), repair them into the box, evaluate, update mean, paths, C, sigma."""
        self.iteration = self.iteration + 1
        noise = torch.randn(self.pop_size, self.dim, generator=self._rng, device="cpu").to(self.mean.device)
        population = repair(self.mean + self.sigma * (noise @ self.D @ self.B), self.lb, self.ub, self.boundary)
        if self.initial is not None and int(self.iteration) == 1:
            population = torch.cat([self.initial.to(population), population[len(self.initial):]])
        _, population = sort_by_key(rank_key(self.evaluate(population)), population)
        selected = population[: self.mu]
        new_mean = self._update_mean(self.mean, selected)
        delta_mean = (new_mean - self.mean).squeeze(0)
        self.p_sigma = self._update_path_sigma(self.p_sigma, self.C_invsqrt, delta_mean)
        h_sigma = self._h_sigma()
        self.p_c = self._update_path_c(self.p_c, h_sigma, delta_mean)
        self.C = self._update_covariance_matrix(self.C, self.p_c, selected, self.mean, h_sigma)
        self.sigma = self._update_step_size(self.sigma)
        self.mean = new_mean
        self.B, self.D, self.C_invsqrt = self._conditional_decomposition(self.iteration, self.C)

    def _h_sigma(self) -> torch.Tensor:
        # Stall the rank-one path while ||p_sigma|| is large (tutorial eq. 45).
        normalised = torch.norm(self.p_sigma) / torch.sqrt(1 - (1 - self.c_sigma) ** (2 * self.iteration))
        return (normalised < (1.4 + 2 / (self.dim + 1)) * self.chi_n).float()

    def _update_covariance_matrix(
        self,
        C: torch.Tensor,
        p_c: torch.Tensor,
        population: torch.Tensor,
        old_mean: torch.Tensor,
        h_sigma: torch.Tensor,
    ) -> torch.Tensor:
        """Tutorial eq. 47 with the rank-one term as the outer product p_c p_c^T (fixes EvoX issue #250)."""
        y = (population - old_mean) / self.sigma  # (mu, N)
        rank_one = torch.outer(p_c, p_c) + (1 - h_sigma) * self.c_c * (2 - self.c_c) * C
        rank_mu = (y.T * self.weights) @ y
        return (1 - self.c_1 - self.c_mu) * C + self.c_1 * rank_one + self.c_mu * rank_mu

    def _conditional_decomposition(
        self, iteration: torch.Tensor, C: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eigendecompose C every `decomp_per_iter` steps, else keep B, D, C^-1/2 (no torch.cond)."""
        if int(iteration) % int(self.decomp_per_iter) == 0:
            B, D, C_invsqrt = self._decomposition(C)
            return B, D, C_invsqrt
        return self.B, self.D, self.C_invsqrt

    def get_extra_state(self) -> dict[str, Any]:
        """The RNG state, saved by `state_dict()`."""
        return {"rng": self._rng.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the RNG state saved by `get_extra_state`."""
        self._rng.set_state(state["rng"])
