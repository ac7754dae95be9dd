"""Model Swarms (Feng et al., arXiv 2410.11163) on merge coefficients."""

from __future__ import annotations

from typing import Any

import torch
from evox.core import Mutable

from .limits import raise_for_arguments
from .swarm import ParticleSwarm, in_space, starting_particles

__all__ = ["ModelSwarms"]


class ModelSwarms(ParticleSwarm):
    """Model Swarms: LLM experts as particles that move towards their personal best, the global best and away from
    the global worst, with randomly weighted, normalised pulls and a decaying step length.

    Per particle i and step, with r_v, r_p, r_g, r_w ~ U(0, 1) drawn per particle (one scalar per term) and
    C = r_v phi_v + r_p phi_p + r_g phi_g + r_w phi_w::

        v_i <- (r_v phi_v v_i + r_p phi_p (p_i - x_i) + r_g phi_g (g - x_i) - r_w phi_w (g_w - x_i)) / C
        x_i <- x_i + lambda v_i,        lambda <- max(lambda * phi_lambda, lambda_min) after each step

    where p_i is the particle's personal best, g the global best and g_w the global worst (the worst position any
    particle has evaluated; a failed, NaN evaluation never becomes it). The swarm starts from the experts, topped up
    to its size by crossover: two distinct parents a, b among the first particles, child w a + (1 - w) b with
    w ~ U(0, 2) (half interpolation, half extrapolation). Each particle's first velocity points at another particle
    chosen at random (v_i = x_j - x_i). A particle whose personal best is ``restart_patience`` evaluations old
    restarts: it moves back to its personal best with zero velocity before its update (again each step until it
    improves). The hyperparameter defaults are the authors' released ones: phi_v = 0.4 (``inertia``), phi_p = 0.3
    (``cognitive``), phi_g = 0.3 (``social``), phi_w = 0.3 (``repel``), lambda = 1 (``step_length``), phi_lambda
    = 0.95 (``step_decay``), lambda_min = 0.1 (``min_step``), restart after 0.5 x patience 10 = 5 evaluations.

    Departures from the paper:

    * **Coefficient space, not weight space.** A particle is a point of the search space (one coefficient per
      expert, or per expert and layer group); expert i is the one-hot e_i, a crossover child the same mix of its
      parents' coefficients (the paper mixes LoRA weights, which for LoRA experts is not the same merge: our merge
      mixes each expert's delta W, the product of its factors).
    * **Starting points** *(ours)*: ``initial`` (the tuned static merges, best first) join the experts as the
      first particles (evaluated first) and as crossover parents; exact repeats are dropped, and a swarm smaller
      than all of them keeps the first ``pop_size``. With a single first particle, the rest of the swarm is
      drawn uniformly from the box.
    * **The box** *(ours)*: positions are clipped into [lb, ub] after each move (weight space has no box).
    * **Budget.** The paper stops when the global best has not improved for ``patience`` (10) iterations or after
      a maximum number; here the run fixes the generations, and the release contest picks among the run's best
      candidates (`evox_merge.run.selection`). The paper also tunes the hyperparameters per task by a small
      random search; here they are fixed (the run has one budget for everything).
    * **Randomness** from a private generator seeded with ``seed`` (the authors' code uses Python's ``random``).
    """

    def __init__(
        self,
        num_experts: int,
        pop_size: int = 20,
        lb: float | torch.Tensor | None = None,
        ub: float | torch.Tensor | None = None,
        seed: int = 0,
        inertia: float = 0.4,
        cognitive: float = 0.3,
        social: float = 0.3,
        repel: float = 0.3,
        step_length: float = 1.0,
        step_decay: float = 0.95,
        min_step: float = 0.1,
        restart_patience: int = 5,
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
            inertia, cognitive, social, repel: phi_v, phi_p, phi_g, phi_w (>= 0, not all 0).
            step_length: lambda, the first step length (> 0).
            step_decay: phi_lambda in (0, 1], lambda's factor after each step.
            min_step: lambda_min >= 0, the step length's floor.
            restart_patience: evaluations without a new personal best after which a particle restarts (>= 1).
            device: device of the state and of the populations handed to the problem.
            space: the search space (`evox_merge.experts.spaces`) when it is not one coefficient per expert: the
                experts are written in its coordinates.
            initial: (M, D) starting points, best first (`common.initial_points`): the first particles.

        Raises:
            MergeInputError: a hyperparameter outside its range (`limits.RULES`), bad bounds or a bad initial.
        """
        raise_for_arguments("ModelSwarms", {
            "inertia": inertia, "cognitive": cognitive, "social": social, "repel": repel,
            "step_length": step_length, "step_decay": step_decay, "min_step": min_step,
            "restart_patience": restart_patience})
        super().__init__(num_experts, pop_size, lb, ub, seed, device, initial)
        self.weights = (float(inertia), float(cognitive), float(social), float(repel))
        self.step_decay, self.min_step, self.restart_patience = float(step_decay), float(min_step), restart_patience
        lower, upper = self.lb.cpu(), self.ub.cpu()
        experts = len(space.expert_names) if space is not None else num_experts
        parents = starting_particles(self.initial, in_space(torch.eye(experts), space), lower, upper, pop_size)
        pop = torch.cat([parents, self._children(parents, pop_size - len(parents), lower, upper)])
        self.set_swarm(pop, self._first_velocities(pop))
        self.step_length = Mutable(torch.tensor(float(step_length), dtype=torch.float64))
        self.stale = Mutable(torch.zeros(pop_size, dtype=torch.int64, device=self.pop.device))
        self.global_worst_location = Mutable(self.pop[0].clone())
        self.global_worst_fit = Mutable(torch.tensor(-torch.inf, device=self.pop.device))

    def _children(self, parents: torch.Tensor, count: int, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """`count` crossover children of two distinct `parents` each (the class docstring), clipped into the box."""
        if count <= 0:
            return parents[:0]
        if len(parents) < 2:
            return lower + (upper - lower) * self.uniform(count, self.dim)
        children = []
        for _ in range(count):
            first = int(self.uniform(1) * len(parents))
            second = int(self.uniform(1) * (len(parents) - 1))
            second += second >= first  # a parent other than the first
            weight = 2 * self.uniform(1)
            children.append(weight * parents[first] + (1 - weight) * parents[second])
        return torch.clamp(torch.stack(children), lower, upper)

    def _first_velocities(self, pop: torch.Tensor) -> torch.Tensor:
        """v_i = x_j - x_i for a particle j != i chosen at random (zero for a swarm of one)."""
        if len(pop) < 2:
            return torch.zeros_like(pop)
        others = (self.uniform(len(pop)) * (len(pop) - 1)).long()
        others += others >= torch.arange(len(pop))
        return pop[others] - pop

    def after_evaluation(self, improved: torch.Tensor, first: bool) -> None:
        """Count the evaluations since each personal best (1: this one), update the global worst (finite
        evaluations only) and, after a move, decay the step length."""
        self.stale = torch.where(improved, torch.ones_like(self.stale), self.stale + 1)
        finite = torch.isfinite(self.fit)
        if bool(finite.any()):
            worst = int(torch.argmax(torch.where(finite, self.fit, -torch.inf)))
            if bool(self.fit[worst] > self.global_worst_fit):
                self.global_worst_location = self.pop[worst].clone()
                self.global_worst_fit = self.fit[worst].clone()
        if not first:
            self.step_length = torch.clamp(self.step_length * self.step_decay, min=self.min_step)

    def move(self) -> None:
        """Restart the particles whose personal best is ``restart_patience`` evaluations old, then one Model Swarms
        move of every particle (the class docstring), the position clipped into the box."""
        restart = (self.stale >= self.restart_patience)[:, None]
        pop = torch.where(restart, self.local_best_location, self.pop)
        velocity = torch.where(restart, torch.zeros_like(self.velocity), self.velocity)
        r = self.uniform(self.pop_size, 4).to(pop.device)
        weights = r * torch.tensor(self.weights, device=pop.device)
        total = weights.sum(-1, keepdim=True)
        weights = torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), 0.0)
        velocity = (weights[:, :1] * velocity + weights[:, 1:2] * (self.local_best_location - pop)
                    + weights[:, 2:3] * (self.global_best_location - pop)
                    - weights[:, 3:4] * (self.global_worst_location - pop))
        self.velocity = velocity
        self.pop = torch.clamp(pop + self.step_length.to(pop) * velocity, self.lb, self.ub)
