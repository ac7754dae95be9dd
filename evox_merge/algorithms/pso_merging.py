"""PSO-Merging (Zhang, Zhang and Feng, arXiv 2508.19839) on merge coefficients."""

from __future__ import annotations

from typing import Any

import torch

from .limits import raise_for_arguments
from .swarm import ParticleSwarm, in_space, starting_particles

__all__ = ["PSOMerging"]


class PSOMerging(ParticleSwarm):
    """PSO-Merging: a particle swarm initialised with the pre-trained model, the expert models and sparsified
    expert models, moved by the standard PSO update (Kennedy and Eberhart, 1995; inertia form of Shi and Eberhart,
    1998) ``v <- w v + c1 r1 (p_i - x_i) + c2 r2 (g - x_i)``, ``x <- x + v``; the global best is the merge.

    Departures from the paper, all forced by searching merge coefficients rather than weights, by the run layer's
    fixed budget, or by what we could read of the paper:

    * **Coefficient space, not weight space.** A particle is a point of the search space (one coefficient per
      expert, or per expert and layer group); the pre-trained model is the zero vector, expert i the one-hot e_i.
    * **Sparsified experts.** The paper sparsifies each expert's weights (a random or magnitude drop of its
      parameters); a coefficient vector cannot drop single parameters, so the sparsified expert i with density d is
      written as d e_i: an unrescaled drop keeping a fraction d of the task vector moves the model d of the way
      from the base towards the expert (in expectation, for a random drop). One per expert at ``density``; slots
      left in the swarm are sparsified experts with densities drawn from U(0, 1), cycling over the experts (the
      paper's swarm is exactly 2N + 1 particles; ours is ``pop_size``, the run's population).
    * **Starting points** *(ours)*: ``initial`` (the tuned static merges, best first) are the first particles,
      evaluated first, then the base, the experts and the sparsified experts; exact repeats are dropped (the best
      single expert is a one-hot) and a swarm smaller than all of them keeps the first ``pop_size``.
    * **Random factors** r1, r2: one U(0, 1) draw per particle and term (the whole merge moves along each pull, as
      in Model Swarms' code), from a private generator seeded with ``seed``.
    * **Hyperparameters.** The defaults are the usual constriction-equivalent PSO settings (Clerc and Kennedy,
      2002: w = 0.7298, c1 = c2 = 1.49618); the paper's own values could not be read here and are not claimed.
    * **The box** *(ours)*: velocities are clamped to +-(ub - lb) and positions clipped into [lb, ub] after each
      move (the weight-space method has no box); the initial velocities are zero.
    * **Budget.** The paper runs a few iterations and returns the global best; here the run decides the number of
      generations, and the release contest picks among the run's best candidates (`evox_merge.run.selection`).
    """

    def __init__(
        self,
        num_experts: int,
        pop_size: int = 20,
        lb: float | torch.Tensor | None = None,
        ub: float | torch.Tensor | None = None,
        seed: int = 0,
        w: float = 0.7298,
        c1: float = 1.49618,
        c2: float = 1.49618,
        density: float = 0.5,
        device: torch.device | None = None,
        space: Any = None,
        initial: torch.Tensor | None = None,
    ):
        """
        Args:
            num_experts: D, the search space's dimension (the number of experts in the expert space).
            pop_size: number of particles. Default 20, EvoGM's.
            lb: lower bound, a float or a (D,) tensor. None: `limits.DEFAULT_LB`, the default box's.
            ub: upper bound, a float or a (D,) tensor. None: `limits.DEFAULT_UB`.
            seed: seed of the private `torch.Generator`.
            w: inertia weight.
            c1: cognitive (personal-best) coefficient.
            c2: social (global-best) coefficient.
            density: the fraction of an expert's task vector a sparsified expert keeps, in (0, 1].
            device: device of the state and of the populations handed to the problem.
            space: the search space (`evox_merge.experts.spaces`) when it is not one coefficient per expert: the
                base, experts and sparsified experts are written in its coordinates.
            initial: (M, D) starting points, best first (`common.initial_points`): the first particles.

        Raises:
            MergeInputError: a hyperparameter outside its range (`limits.RULES`), bad bounds or a bad initial.
        """
        raise_for_arguments("PSOMerging", {"w": w, "c1": c1, "c2": c2, "density": density})
        super().__init__(num_experts, pop_size, lb, ub, seed, device, initial)
        self.w, self.c1, self.c2 = float(w), float(c1), float(c2)
        experts = len(space.expert_names) if space is not None else num_experts
        eye = torch.eye(experts)
        structured = in_space(torch.cat([torch.zeros(1, experts), eye, density * eye]), space)
        pop = starting_particles(self.initial, structured, self.lb.cpu(), self.ub.cpu(), pop_size)
        missing = pop_size - len(pop)
        if missing > 0:
            densities = self.uniform(missing, 1)
            which = eye[torch.arange(missing) % experts]
            extra = torch.clamp(in_space(densities * which, space), self.lb.cpu(), self.ub.cpu())
            pop = torch.cat([pop, extra])
        self.set_swarm(pop, torch.zeros_like(pop))
        self.register_buffer("v_max", (self.ub - self.lb)[None, :].clone(), persistent=False)

    def move(self) -> None:
        """One PSO move of every particle (see the class docstring), clamped velocity, clipped position."""
        r1 = self.uniform(self.pop_size, 1).to(self.pop.device)
        r2 = self.uniform(self.pop_size, 1).to(self.pop.device)
        velocity = (self.w * self.velocity + self.c1 * r1 * (self.local_best_location - self.pop)
                    + self.c2 * r2 * (self.global_best_location - self.pop))
        self.velocity = torch.clamp(velocity, -self.v_max, self.v_max)
        self.pop = torch.clamp(self.pop + self.velocity, self.lb, self.ub)
