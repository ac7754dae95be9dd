"""EvoGMHistory: every candidate EvoGM evaluated, with its round labels (arXiv 2605.29295's archive H, all rounds)."""

from __future__ import annotations

import torch

__all__ = ["EvoGMHistory"]


class EvoGMHistory:
    """Every candidate EvoGM evaluated, in evaluation order; CPU tensors that grow by one population per step.

    Attributes:
        coefficients: (E, N) lambda, in the expert basis of the candidate's round.
        original_coefficients: (E, N) c = M^T lambda in the original expert basis: exactly what the problem received.
        fitness: (E,) fitness as the algorithm saw it ((E, M) objective vectors in EvoGM's pareto mode). EvoX algorithms minimise, so under
            `StdWorkflow(opt_direction="max")` (evox-merge's convention) this is minus the problem's score.
            NaN and inf are kept as returned.
        round: (E,) int64, 0-based round index.
        iteration: (E,) int64, 0 for a round's initial population, t >= 1 for its t-th generated population.
        generation: (E,) int64, the workflow step that evaluated it (0 is `init_step`).
    """

    _FIELDS = ("coefficients", "original_coefficients", "fitness", "round", "iteration", "generation")

    def __init__(self, num_experts: int) -> None:
        self.coefficients = torch.empty(0, num_experts, device="cpu")
        self.original_coefficients = torch.empty(0, num_experts, device="cpu")
        self.fitness = torch.empty(0, device="cpu")
        self.round = torch.empty(0, dtype=torch.int64, device="cpu")
        self.iteration = torch.empty(0, dtype=torch.int64, device="cpu")
        self.generation = torch.empty(0, dtype=torch.int64, device="cpu")

    def __len__(self) -> int:
        return len(self.fitness)

    def append(
        self,
        coefficients: torch.Tensor,
        original_coefficients: torch.Tensor,
        fitness: torch.Tensor,
        round: int,
        iteration: int,
        generation: int,
    ) -> None:
        """Add one evaluated population: (P, N), (P, N), (P,) tensors and its labels."""
        if len(self) == 0 and fitness.ndim == 2:  # objective vectors (EvoGM's pareto mode): (E, M) from now on
            self.fitness = torch.empty(0, fitness.shape[1], device="cpu")
        labels = {"round": round, "iteration": iteration, "generation": generation}
        new = {"coefficients": coefficients, "original_coefficients": original_coefficients, "fitness": fitness}
        for name, value in labels.items():
            new[name] = torch.full((len(fitness),), value, dtype=torch.int64, device="cpu")
        for name in self._FIELDS:
            setattr(self, name, torch.cat([getattr(self, name), new[name].detach().cpu()]))

    def of_round(self, round: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The archive H of one round: its coefficients (H, N) in that round's basis and their fitness (H,)."""
        mask = self.round == round
        return self.coefficients[mask], self.fitness[mask]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The history as a dict of tensors (checkpointable with `torch.save`, loadable with `weights_only=True`)."""
        return {name: getattr(self, name).clone() for name in self._FIELDS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the history, in place, with one from `state_dict`."""
        for name in self._FIELDS:
            setattr(self, name, state[name].clone())
