"""What EvoGM (`evox_merge.algorithms.evogm`) tells the run layer and keeps in a checkpoint: EvoX's ``record_step``,
the racing quota, the candidate annotations and recipe facts (`evox_merge.algorithms.common` protocols), and the
search state outside buffers (``get_extra_state``), as a mixin of `EvoGM`.

**Inspecting a run** (read it from `workflow.algorithm`; the objects are shared with the instance passed in):

* `history`: an `EvoGMHistory` of every evaluation (both bases, fitness, round, iteration, generation);
* `bases`: list of the (N, N) basis matrices M_r, one per round begun, and `basis_records`: for each round,
  the history indices of the vectors that became its basis (empty for round 0);
* `generator_log`: one dict per generated population: round, iteration, generation, `winners`/`losers` sizes,
  `losses` ((train_steps, 3): total, cycle, optimisation-guided per Adam step), `seconds` (training plus
  generation wall time), `sigma` (mutation step used) and `replaced` (cached candidates replaced);
* `pop`/`fit`: the current population (P, N) in the round's basis and its fitness; `record_step()` reports the
  population in the original basis;
* `best_coefficients`/`best_fitness`: the best evaluation so far, in the original basis;
* `switches`: the active `EvoGMSwitches`, `variant` its preset's name.

**Checkpoints.** `state_dict()` carries the whole search state: `pop`/`fit` and the hyperparameters as buffers and
parameters, and, through `get_extra_state`, the history, bases, generator log, generator weights with their Adam
state, the carried elites, sigma and the RNG state. `torch.save(workflow.state_dict(), path)` during a run, then
build the same algorithm and workflow, `workflow.load_state_dict(torch.load(path, weights_only=True))` and keep
stepping: the continuation is identical to an uninterrupted run.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .common import kth_best

__all__ = ["EvoGMRunFacts"]


class EvoGMRunFacts:
    """`EvoGM`'s run-layer protocol and checkpoint state (a mixin: the attributes are `EvoGM`'s)."""

    @property
    def bases(self) -> list[torch.Tensor]:
        """The (N, N) basis matrices M_r, one per round begun (`RoundBasis.bases`)."""
        return self._basis.bases

    @property
    def basis_records(self) -> list[list[int]]:
        """Per round, the history indices of the vectors that became its basis (empty for round 0)."""
        return self._basis.records

    @property
    def skipped_shifts(self) -> list[int]:
        """The rounds whose guarded shift kept the previous basis."""
        return self._basis.skipped

    def record_step(self) -> dict[str, torch.Tensor]:
        """The current population in the original expert basis (P, N) and its fitness (P,), for EvoX monitors."""
        return {"pop": self.pop @ self.bases[-1].to(self.pop.device), "fit": self.fit}

    def racing_threshold(self, lower_bounds: torch.Tensor) -> float:
        """Racing quota (`evox_merge.algorithms.common.RacingQuota`): a candidate is used if it can enter the
        round archive's winner share ``rho`` or its best P (carried into the next round, and the initial
        population kept), i.e. reach the m-th best of the archive so far and this population's lower bounds,
        ``m = max(ceil(rho (H + P)), P)``. The archive holds minimised fitness; the problem's is maximised."""
        _, _, fitness = self._round_data()
        archive = -fitness.double() if fitness.ndim == 1 else torch.empty(0, dtype=torch.float64)
        pool = torch.cat([archive, lower_bounds.double()])
        m = max(math.ceil(float(self.winner_ratio) * len(pool)), self.pop_size)
        return kth_best(pool, m)

    def candidate_annotations(self) -> dict[str, Any]:
        """Annotations of the population evaluated in the last step (`evox_merge.algorithms.common` protocol).

        The round, the iteration, each candidate's coefficients in the round's basis, (from round 1 on)
        ``basis_records``, the evaluation indices (record ids) of the N vectors that form the round's basis, and
        ``parents``: per candidate, the evaluation index of the population row it was generated from (a generated
        population), the round's basis (an initial population: ``"experts"`` in round 0, else the basis records) or
        ``"none"`` (uniform draws when no fitness was finite).
        """
        coefficients, iteration = self._evaluating
        parents = self._evaluating_parents
        if not (isinstance(parents, list) and parents and isinstance(parents[0], list)):
            parents = [parents] * len(coefficients)  # one value for the whole population
        annotations: dict[str, Any] = {
            "round": self.current_round,
            "iteration": iteration,
            "coefficients_round_basis": coefficients.tolist(),
            "parents": parents,
        }
        if self.current_round > 0:
            annotations["basis_records"] = [self.basis_records[-1]] * len(coefficients)
        return annotations

    def recipe_facts(self) -> dict[str, Any]:
        """For recipe.json: every round's basis (rows in the original expert basis), the records behind it, the
        variant and its switches, the rounds whose guarded basis shift kept the old basis, and how many candidates
        were projected back into the box after a shift (`evox_merge.algorithms.evogm_basis`)."""
        return {
            "round_bases": [basis.tolist() for basis in self.bases],
            "basis_records": self.basis_records,
            "variant": self.variant,
            "switches": self.switches.as_dict(),
            "skipped_shifts": list(self.skipped_shifts),
            "repaired_into_box": self._basis.projected,
        }

    def get_extra_state(self) -> dict[str, Any]:
        """Search state outside buffers (it grows, or is not a tensor), saved by `state_dict()`."""
        return {
            "history": self.history.state_dict(),
            **self._basis.state_dict(),
            "generator_log": [dict(entry) for entry in self.generator_log],
            "generators": self._generators.state_dict(),
            "carried_index": self._carried_index.clone(),
            "carried_coefficients": self._carried_coefficients.clone(),
            "sigma": self._sigma,
            "rng": self._rng.get_state(),
            "pop_index": self._pop_index.clone(),
            "evaluating_parents": self._evaluating_parents,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore `get_extra_state`'s dict, in place (the workflow's copy of the algorithm shares these objects)."""
        self.history.load_state_dict(state["history"])
        self._basis.load_state_dict(state)
        self.generator_log[:] = [dict(entry) for entry in state["generator_log"]]
        self._generators.load_state_dict(state["generators"])
        self._carried_index = state["carried_index"].clone()
        self._carried_coefficients = state["carried_coefficients"].clone()
        self._sigma = float(state["sigma"])
        self._rng.set_state(state["rng"])
        if "pop_index" in state:  # checkpoints written before parents were tracked lack it
            self._pop_index = state["pop_index"].clone()
            self._evaluating_parents = state["evaluating_parents"]
