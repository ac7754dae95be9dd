"""EvoGM, then CMA-ES (ours): EvoGM's generative start for the first generations of a run, then covariance-adapted
local steps seeded from what EvoGM found (issue 29, point 3).

Measured on the tiny zoo (benchmarks/results/search_quality.md): EvoGM leads CMA-ES early (its initial population
of structured merges, then learned steps) and CMA-ES overtakes it later (its adapted covariance refines faster).
`EvoGMHybrid` runs EvoGM (`evox_merge.algorithms.evogm.EvoGM`, default variant unless told otherwise, one round) for
``generative_generations`` generations, then hands the run to `BoundedCMAES` (`evox_merge.algorithms.cmaes`) with
its mean at the best candidate found, its step size and covariance from the elites of EvoGM's history
(`elite_distribution`). The switch happens after a fixed number of generations, whatever the budget, so a run of B
evaluations is exactly the first B evaluations of any longer run with the same seed (an anytime algorithm).
Measured against EvoGM and CMA-ES in benchmarks/results/evogm_hybrid.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from evox.core import Algorithm

from evox_merge.util.errors import MergeInputError

from .cmaes import SIGMA_RANGE, BoundedCMAES
from .common import CandidateAnnotations, RacingQuota, coefficient_bounds, rank_order
from .evogm import EvoGM
from .limits import pop_size_problem, raise_for_arguments

__all__ = ["EvoGMHybrid", "elite_distribution"]


def elite_distribution(
    coefficients: torch.Tensor, fitness: torch.Tensor, weights: torch.Tensor, lb: torch.Tensor, ub: torch.Tensor,
    shrinkage: float,
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """CMA-ES's starting distribution from an archive of evaluated points *(ours)*: ``(mean, sigma, C)``.

    The mean is the best point (minimised `fitness`, NaN/inf last). The covariance is the weighted covariance of the
    ``mu = len(weights)`` best points about their weighted mean (CMA-ES's recombination `weights`, best first: the
    rank-mu estimate of the tutorial, arXiv:1604.00772, eq. 30 with the elites' own mean); sigma is the root mean
    variance per coordinate, kept within `cmaes.SIGMA_RANGE` times the mean box width, and C that covariance over
    sigma^2 (trace N), shrunk towards the identity by `shrinkage` (the elites of a short run may span fewer than N
    directions; C stays positive definite).

    Args:
        coefficients: (H, N) evaluated points, in the search's coordinates.
        fitness: (H,) their fitness under minimisation.
        weights: (mu,) or (1, mu) positive recombination weights summing to 1.
        lb, ub: (N,) the box.
        shrinkage: in [0, 1], the identity's share of C.
    """
    order = rank_order(fitness)
    finite = order[torch.isfinite(fitness[order])]
    if len(finite) == 0:
        raise MergeInputError("EvoGMHybrid: no finite fitness in EvoGM's history to start CMA-ES from")
    weights = weights.reshape(-1).double().cpu()
    elites = coefficients[finite[: len(weights)]].double()
    w = weights[: len(elites)] / weights[: len(elites)].sum()
    centre = w @ elites
    covariance = ((elites - centre).T * w) @ (elites - centre)
    dim = coefficients.shape[1]
    width = float((ub - lb).double().mean())
    spread = float(covariance.trace() / dim) ** 0.5
    sigma = min(max(spread, SIGMA_RANGE[0] * width), SIGMA_RANGE[1] * width)
    shape = covariance / (spread ** 2) if spread > 0 else torch.eye(dim, dtype=torch.float64)
    shape = (1 - shrinkage) * shape + shrinkage * torch.eye(dim, dtype=torch.float64)
    return coefficients[finite[0]].float().clone(), sigma, shape.float()


class EvoGMHybrid(Algorithm):
    """EvoGM for the first ``generative_generations`` generations, then CMA-ES from what it found *(ours)*.

    * Generations 1 to k = ``generative_generations``: EvoGM (arXiv 2605.29295) in one round: its initial population
      (``initial`` starting points first, the tuned static merges in a search; then the average, the one-hot
      experts, uniform draws) and k - 1 generated populations.
    * Then `BoundedCMAES` with mean at the best candidate so far, sigma and C from the elites of the whole history
      (`elite_distribution`, mu = P // 2, CMA-ES's weights), evolution paths at zero; every later generation is a
      CMA-ES step, repaired into the box like any CMA-ES sample.

    One step is one generation of `pop_size` evaluations (``init_step`` the first), every candidate lies in the box
    [lb, ub]. Randomness comes from the two algorithms' private generators (seeded with `seed`); `state_dict()`
    carries both algorithms' state and the generation count, so a resumed run is bit-identical.
    """

    def __init__(
        self,
        num_experts: int,
        pop_size: int = 20,
        lb: float | torch.Tensor | None = None,
        ub: float | torch.Tensor | None = None,
        seed: int = 0,
        device: torch.device | None = None,
        space: Any = None,
        initial: torch.Tensor | None = None,
        generative_generations: int = 2,
        shrinkage: float = 0.2,
        variant: str = "default",
        train_steps: int = 200,
        hidden_sizes: Sequence[int] = (128, 256, 256, 256, 128),
        boundary: Literal["clip", "reflect"] = "clip",
    ):
        """
        Args:
            num_experts: N, the search's dimension.
            pop_size: P, evaluations per generation (at least 2).
            lb, ub: the box, floats or (N,) tensors (None: the default box, `limits.DEFAULT_LB`/``DEFAULT_UB``).
            seed: seed of both algorithms' private generators.
            device: device of the populations handed to the problem.
            space: the search space when it is not one coefficient per expert (EvoGM's structured start uses it).
            initial: (M, N) starting points, best first (`common.initial_points`): EvoGM's first rows.
            generative_generations: k >= 1, generations run by EvoGM before CMA-ES takes over (1: EvoGM's initial
                population only).
            shrinkage: in [0, 1], the identity's share of CMA-ES's starting covariance (`elite_distribution`).
            variant: EvoGM's variant ("default" or "paper").
            train_steps: EvoGM's generator training steps per generation.
            hidden_sizes: EvoGM's generator widths.
            boundary: how CMA-ES repairs samples into the box ("clip" or "reflect").

        Raises:
            MergeInputError: an argument outside its range (named), or what EvoGM and BoundedCMAES refuse.
        """
        super().__init__()
        problem = pop_size_problem("EvoGMHybrid", pop_size)
        if problem:
            raise MergeInputError(problem)
        raise_for_arguments("EvoGMHybrid", {"generative_generations": generative_generations, "shrinkage": shrinkage,
                                            "boundary": boundary})
        self.lb, self.ub = coefficient_bounds(num_experts, lb, ub)
        self.pop_size = pop_size
        self.generative_generations = generative_generations
        self.shrinkage = float(shrinkage)
        self.evogm = EvoGM(num_experts, pop_size=pop_size, num_rounds=1,
                           iterations_per_round=max(generative_generations - 1, 1), lb=self.lb, ub=self.ub,
                           seed=seed, device=device, variant=variant, train_steps=train_steps,
                           hidden_sizes=hidden_sizes, space=space,
                           initial=initial)
        self.cmaes = BoundedCMAES(num_experts, pop_size=pop_size, lb=self.lb, ub=self.ub, seed=seed,
                                  boundary=boundary, device=device, space=space)
        # Mutated in place, never rebound: the workflow runs a copy of this module whose attributes are a shallow
        # copy of ours (EvoX's StdWorkflow), and the run layer asks the original for annotations and racing.
        self._state: dict[str, Any] = {"generation": 0, "switch": {}, "last_phase": None}

    @property
    def generation(self) -> int:
        """Generations run so far."""
        return int(self._state["generation"])

    @property
    def switch(self) -> dict[str, Any]:
        """CMA-ES's start (empty before the switch): the generation, its mean and sigma, EvoGM's evaluations."""
        return self._state["switch"]

    @property
    def phase(self) -> Literal["evogm", "cmaes"]:
        """The algorithm that runs the next generation (before the switch, "evogm")."""
        return "evogm" if self.generation < self.generative_generations else "cmaes"

    def init_step(self) -> None:
        """The first generation: EvoGM's initial population."""
        self.step()

    def step(self) -> None:
        """One generation of P evaluations, by EvoGM or (from generation k + 1 on) CMA-ES."""
        phase = self.phase
        if phase == "cmaes" and not self.switch:
            self._start_cmaes()
        self._state["running"] = phase
        algorithm = self.evogm if phase == "evogm" else self.cmaes
        algorithm.evaluate = self.evaluate  # the workflow's evaluation, whichever algorithm asks for it
        if phase == "evogm" and self.generation == 0:
            algorithm.init_step()
        else:
            algorithm.step()
        self._state["generation"] += 1
        self._state["last_phase"] = phase

    def _start_cmaes(self) -> None:
        """Seed CMA-ES from EvoGM's history (`elite_distribution`); its iteration count and paths start at zero."""
        history = self.evogm.history
        mean, sigma, shape = elite_distribution(history.original_coefficients, history.fitness,
                                                self.cmaes.weights, self.lb, self.ub, self.shrinkage)
        device = self.cmaes.mean.device
        cmaes = self.cmaes
        cmaes.mean = mean[None].to(device)
        cmaes.sigma = torch.tensor(sigma, device=device)
        cmaes.C = shape.to(device)
        cmaes.B, cmaes.D, cmaes.C_invsqrt = cmaes._decomposition(cmaes.C)
        cmaes.p_sigma = torch.zeros_like(cmaes.p_sigma)
        cmaes.p_c = torch.zeros_like(cmaes.p_c)
        cmaes.iteration = torch.zeros_like(cmaes.iteration)
        self._state["switch"] = {"generation": self.generation, "mean": mean.tolist(), "sigma": sigma,
                                 "evaluations_before": len(history)}

    def record_step(self) -> dict[str, torch.Tensor]:
        """For EvoX monitors: EvoGM's population and fitness (original basis) before the switch; after it, CMA-ES
        keeps no population (an empty (0, N) one)."""
        if self._running() == "evogm":
            return self.evogm.record_step()
        empty = self.cmaes.mean[:0]
        return {"pop": empty, "fit": empty[:, 0]}

    def racing_threshold(self, lower_bounds: torch.Tensor) -> float:
        """Racing quota (`common.RacingQuota`) of the algorithm running this generation."""
        algorithm: RacingQuota = self.evogm if self._running() == "evogm" else self.cmaes
        return algorithm.racing_threshold(lower_bounds)

    def _running(self) -> str:
        """The phase of the generation being run or just run."""
        return self._state["running"] if "running" in self._state else self.phase

    def candidate_annotations(self) -> dict[str, Any]:
        """The phase of the population just evaluated, and EvoGM's own annotations during its generations."""
        phase = self._state["last_phase"] or self.phase
        extra = self.evogm.candidate_annotations() if phase == "evogm" and isinstance(
            self.evogm, CandidateAnnotations) else {}
        return {"phase": phase, **extra}

    def recipe_facts(self) -> dict[str, Any]:
        """For recipe.json: the switch (its generation, CMA-ES's starting mean and sigma) and EvoGM's facts."""
        return {"generative_generations": self.generative_generations, "shrinkage": self.shrinkage,
                "switch": dict(self.switch), "evogm": self.evogm.recipe_facts()}

    def get_extra_state(self) -> dict[str, Any]:
        """The generation count and the switch's facts, saved by `state_dict()` (each algorithm saves its own)."""
        return {**self._state, "switch": dict(self.switch)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore `get_extra_state`'s dict."""
        self._state.clear()
        self._state.update({**state, "generation": int(state["generation"]), "switch": dict(state["switch"])})
