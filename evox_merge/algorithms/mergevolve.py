"""MERGEvolve: an evolution strategy that starts from a merged model and perturbs it off the experts' span.

The source document (../shared/seeds/, MERGEvolve) asks whether merges can be improved by leaving the convex /
linear span of the experts. The search point is a *centre*, a dense weight delta per target layer (initially a
merge of the experts, e.g. a search's release); candidates are the centre plus seeded low-rank Gaussian
perturbations (`evox_merge.experts.spaces.PerturbationSpace`), so a population is ``(seed, sign)`` pairs and never
P copies of the model: one model, the centre and one perturbation at a time. Each generation evaluates the centre
itself (sign 0) and K antithetic pairs (the same seed with sign +1 and -1), then moves the centre along the
rank-weighted sum of the pairs' perturbations (OpenES with mirrored sampling and centred ranks, as EvoX's `OpenES`
and `VirtualLoRAES`, whose Philox streams it reuses to regenerate each perturbation from its seed).

Seeds are drawn below 2^24 so that they survive the float32 population tensor exactly; they come from a private
generator seeded with `seed`, so a run and its resume draw the same perturbations.
"""

from __future__ import annotations

from typing import Any

import torch
from evox.core import Algorithm, Mutable
from evox.triton_kernels.kernels.lora_noise import lora_gradient

from evox_merge.experts.spaces import PerturbationSpace
from evox_merge.util.errors import MergeInputError

SEED_LIMIT = 2 ** 24


def centred_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks of `values` (lowest 0) mapped to [-0.5, 0.5]."""
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[values.argsort()] = torch.arange(len(values), dtype=torch.float64)
    return ranks / max(len(values) - 1, 1) - 0.5


class MERGEvolve(Algorithm):
    """The centre's ES over a `PerturbationSpace` (see the module docstring).

    Args:
        space: the perturbation space; its centre is the starting merge and moves every step.
        pairs: K antithetic pairs per generation (population 2K + 1: the centre, then the pairs).
        learning_rate: the centre's step, in units of each layer's perturbation scale ``sigma_l``.
        seed: seeds the perturbation seeds.
    """

    def __init__(self, space: PerturbationSpace, pairs: int = 4, learning_rate: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        if pairs < 1 or learning_rate <= 0:
            raise MergeInputError(f"MERGEvolve needs pairs >= 1 and learning_rate > 0, got {pairs}, {learning_rate}")
        self.space = space
        self.pairs = pairs
        self.pop_size = 2 * pairs + 1
        self.learning_rate = learning_rate
        self.centre = Mutable(torch.cat([space.centre[name].reshape(-1) for name in space.layer_names]))
        self.generation = Mutable(torch.tensor(0))
        self.seed = seed
        self.history: list[dict[str, Any]] = []

    def _seeds(self, generation: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + generation)
        return torch.randint(0, SEED_LIMIT, (self.pairs,), generator=generator, dtype=torch.int64)

    def _sync_space(self) -> None:
        start, centre = 0, {}
        for name, shape in zip(self.space.layer_names, self.space.shapes):
            size = shape[0] * shape[1]
            centre[name] = self.centre[start : start + size].reshape(shape)
            start += size
        self.space.centre = centre

    def population(self, generation: int) -> torch.Tensor:
        """Generation `generation`'s candidates ``(2K + 1, 2)``: ``(0, 0)`` (the centre), then ``(s_k, +1)``,
        ``(s_k, -1)`` for each pair."""
        seeds = self._seeds(generation).double()
        pairs = torch.stack([torch.stack([seeds, torch.ones_like(seeds)], 1),
                             torch.stack([seeds, -torch.ones_like(seeds)], 1)], 1).reshape(-1, 2)
        return torch.cat([torch.zeros(1, 2, dtype=torch.float64), pairs]).float()

    def init_step(self) -> None:
        self.step()

    def step(self) -> None:
        generation = int(self.generation)
        self._sync_space()
        population = self.population(generation)
        fitness = self.evaluate(population).double().cpu()  # minimised (the workflow negates the problem's)
        ranks = centred_ranks(fitness.nan_to_num(nan=float("inf")))
        weights = ranks[1::2] - ranks[2::2]  # > 0 where +perturbation was worse (higher minimised fitness)
        factors = self.space.factors(self._seeds(generation))  # the pairs' factors, never K dense perturbations
        moved = []
        for name, shape in zip(self.space.layer_names, self.space.shapes):
            a, b = factors[name]
            # sum_k w_k B_k A_k / K (EvoX's estimator with sigma 1), in units of the unit perturbation
            direction = lora_gradient(weights.float(), a, b, self.pairs, 1.0, shape) / self.space.rank ** 0.5
            scale = self.space.sigma * self.space.scales[name]
            moved.append((self.space.centre[name] - self.learning_rate * scale * direction).reshape(-1))
        self.centre = torch.cat(moved)
        self.generation = torch.tensor(generation + 1)
        self.history.append({"generation": generation, "centre_fitness": float(-fitness[0]),
                             "best_pair_fitness": float(-fitness[1:].min())})
        self._sync_space()

    def centre_deltas(self) -> dict[str, torch.Tensor]:
        """The current centre, a dense delta per target layer (the release)."""
        self._sync_space()
        return {name: delta.clone() for name, delta in self.space.centre.items()}

    def candidate_annotations(self) -> dict[str, Any]:
        return {"operator": "mergevolve", "parents": "none"}
