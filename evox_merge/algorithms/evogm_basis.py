"""EvoGM's round bases: the basis shift as a change of coordinates, and the one box every candidate lies in.

The algorithm keeps M_r, the (N, N) matrix whose rows are round r's experts written in the original experts
(M_0 = I, M_{r+1} = Lambda_r M_r with Lambda_r the round's top-N vectors as rows; arXiv 2605.29295, "Basis Shift"),
and always hands the problem c = M_r^T lambda (rows: ``lambda @ M_r``). For linear merging,
theta(lambda in round r's basis) == theta(c in the original basis), so the problem never changes state and any
EvoX problem can run EvoGM.

**One box** *(ours, every variant)*. The generators see lambda in the box [lb, ub] (mapped onto their tanh range
[-1, 1]); after a shift, c = M_r^T lambda may leave that box (the paper's code lets it: coefficients up to 1.93 on our
zoo). `RoundBasis.repair` projects c into the same box [lb, ub] (per coordinate) and writes the projected point back
in the round's basis, so every candidate EvoGM evaluates lies in the box CMA-ES, PSO and random search search
(tests/test_search_space.py). A repaired lambda may then lie outside the lambda box; it is what was evaluated.
"""

from __future__ import annotations

from typing import Any

import torch

from .evogm_variants import diverse_basis

__all__ = ["RoundBasis"]


class RoundBasis:
    """The bases M_0 .. M_r of the rounds begun, the records behind each, and the box.

    Attributes:
        lb, ub: (N,) bounds of lambda and of c.
        bases: one (N, N) matrix per round begun (rows: the round's experts in the original basis).
        records: per round, the history indices of the vectors that form its basis (empty for round 0).
        skipped: the rounds whose guarded shift found no well-conditioned basis and kept the previous one.
        projected: how many candidates `repair` projected back into the box after a shift (recipe.json's
            ``repaired_into_box``).
    """

    def __init__(self, num_experts: int, lb: torch.Tensor, ub: torch.Tensor) -> None:
        self.lb, self.ub = lb, ub
        self._center, self._half_width = (ub + lb) / 2, (ub - lb) / 2
        self.bases: list[torch.Tensor] = [torch.eye(num_experts, device="cpu")]
        self.records: list[list[int]] = [[]]
        self.skipped: list[int] = []
        self.projected = 0

    @property
    def current(self) -> torch.Tensor:
        """M_r of the round in progress."""
        return self.bases[-1]

    def to_generator_space(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Affine map of the box onto the generators' [-1, 1]^N (the identity for the box [-1, 1])."""
        return (coefficients - self._center) / self._half_width

    def from_generator_space(self, values: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_generator_space`."""
        return self._center + self._half_width * values

    def to_original(self, coefficients: torch.Tensor) -> torch.Tensor:
        """c = M_r^T lambda for (P, N) rows of `coefficients`, in the box (a `repair`ed lambda maps into it up to
        rounding; the clamp removes the rounding)."""
        return torch.clamp(coefficients @ self.current, self.lb, self.ub)

    def repair(self, coefficients: torch.Tensor) -> torch.Tensor:
        """(P, N) lambda clipped into the lambda box, then, for the rows whose c = M_r^T lambda leaves the box, the
        lambda of c projected into the box (least squares: where M_r is singular, the nearest point of its span)."""
        coefficients = torch.clamp(coefficients, self.lb, self.ub)
        original = coefficients @ self.current
        projected = torch.clamp(original, self.lb, self.ub)
        outside = (projected != original).any(-1)
        if not bool(outside.any()):
            return coefficients
        self.projected += int(outside.sum())
        repaired = coefficients.clone()
        repaired[outside] = self.coordinates_of(projected[outside])
        return repaired

    def coordinates_of(self, original: torch.Tensor) -> torch.Tensor:
        """(P, N) original-basis vectors written in the round's basis (lambda with lambda @ M_r = c): an LU solve,
        or, where M_r is singular, the pseudo-inverse (the least-squares lambda of least norm). Both give the same
        bits on every call; MKL's ``lstsq`` does not (measured: 200 calls on one input, several results), which
        made a resumed run differ from an uninterrupted one."""
        basis = self.current.double()
        solution, info = torch.linalg.solve_ex(basis.T, original.double().T)
        if int(info) != 0 or not bool(torch.isfinite(solution).all()):
            solution = torch.linalg.pinv(basis.T) @ original.double().T
        return solution.T.float()

    def shift(self, index: torch.Tensor, coefficients: torch.Tensor, original: torch.Tensor, order: torch.Tensor,
              guarded: bool, max_condition: float) -> bool:
        """Begin the next round's basis from the round's archive: history `index` (H,), lambda `coefficients`
        (H, N), `original` c (H, N), ranked best first by `order`. The top N (`guarded`: the first N that keep
        the condition number <= `max_condition`, `diverse_basis`); False when the guarded shift finds too few
        and the basis is kept."""
        num = self.current.shape[0]
        chosen = diverse_basis(original, order, num, max_condition) if guarded else order[:num].tolist()
        if chosen is None:
            self.skipped.append(len(self.bases))
            self.bases.append(self.current.clone())
            self.records.append(list(self.records[-1]))
            return False
        # Rows: the chosen vectors (round-basis lambda) written in the original experts.
        self.bases.append(coefficients[chosen] @ self.current)
        self.records.append(index[chosen].tolist())
        return True

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (`EvoGM.get_extra_state`)."""
        return {"bases": [basis.clone() for basis in self.bases], "basis_records": [list(r) for r in self.records],
                "skipped_shifts": list(self.skipped), "projected": self.projected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`'s dict in place (the lists are shared with the workflow's copy of the algorithm)."""
        self.bases[:] = [basis.clone() for basis in state["bases"]]
        self.records[:] = [list(records) for records in state["basis_records"]]
        self.skipped[:] = list(state["skipped_shifts"])
        self.projected = int(state.get("projected", 0))  # checkpoints written before the box repair lack it
