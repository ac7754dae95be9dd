"""EvoX's multi-objective algorithms (NSGA-II, NSGA-III, MOEA/D, RVEA, HypE) with evox-merge's constructor shape.

Each class is the EvoX algorithm itself, built as ``Cls(num_experts, pop_size=, n_objs=, lb=, ub=, seed=)``: the
bounds become ``(N,)`` float32 tensors (`coefficient_bounds`), torch's global RNG is seeded with `seed` before the
initial population is drawn (EvoX draws it in ``__init__`` and every later variation from the global RNG, which the
run's checkpoint saves and restores), and the run layer gives ``n_objs``. The facts checked here (docs/evox.md):

* all five minimise every objective and expect ``(P, n_objs)`` fitness; evox-merge's objectives are higher-is-better
  and ``StdWorkflow(opt_direction="max")`` negates the whole matrix (a scalar -1 times it);
* every candidate they hand the problem lies in ``[lb, ub]`` (polynomial mutation then a clamp);
* NSGA-II, NSGA-III, RVEA and HypE evaluate ``pop_size`` candidates per step; MOEA/D evaluates them one at a time
  (``pop_size`` evaluations of one candidate per step), replaces ``pop_size`` by the number of uniform weight
  vectors it draws (e.g. 12 -> 12 for 2 objectives, fewer or more for 3) and needs a neighbourhood (a tenth of the
  population, rounded up) of at least 2, so at least 11 of them: `MergeMOEAD` refuses fewer (EvoX fails with an
  IndexError), counted before EvoX draws them (`evox_merge.algorithms.limits.pop_size_problem`, also what a search
  config is checked with);
* RVEA keeps NaN rows in its own population for empty reference vectors; it never evaluates them.

None of them exposes which individuals a child came from, so their records' parents are ``"none"``.
"""

from __future__ import annotations

from typing import Any

import torch
from evox.algorithms import HypE, MOEAD, NSGA2, NSGA3, RVEA

from evox_merge.util.errors import MergeInputError

from .common import coefficient_bounds
from .limits import pop_size_problem, raise_for_arguments

__all__ = ["MergeHypE", "MergeMOEAD", "MergeNSGA2", "MergeNSGA3", "MergeRVEA"]


def _build(cls: type, algorithm: Any, num_experts: int, pop_size: int, n_objs: int,
           lb: float | torch.Tensor | None, ub: float | torch.Tensor | None, seed: int, **kwargs: Any) -> None:
    # The population and arguments by the rules a search config is checked with (`evox_merge.algorithms.limits`).
    problem = pop_size_problem(type(algorithm).__name__, pop_size, n_objs)
    if problem:
        raise MergeInputError(problem)
    raise_for_arguments(type(algorithm).__name__, {k: v for k, v in kwargs.items() if k != "device"})
    lower, upper = coefficient_bounds(num_experts, lb, ub)
    torch.manual_seed(seed)
    cls.__init__(algorithm, pop_size=pop_size, n_objs=n_objs, lb=lower, ub=upper, **kwargs)
    algorithm.num_experts = num_experts


class _Parentless:
    def candidate_annotations(self) -> dict[str, Any]:
        """EvoX's algorithms do not expose a child's parents: recorded as ``"none"``, never invented."""
        return {"parents": "none"}


class MergeNSGA2(_Parentless, NSGA2):
    """NSGA-II (EvoX) over N merge coefficients."""

    def __init__(self, num_experts: int, pop_size: int = 20, n_objs: int = 2, lb: float | torch.Tensor | None = None,
                 ub: float | torch.Tensor | None = None, seed: int = 0, device: torch.device | None = None):
        _build(NSGA2, self, num_experts, pop_size, n_objs, lb, ub, seed, device=device)


class MergeNSGA3(_Parentless, NSGA3):
    """NSGA-III (EvoX) over N merge coefficients."""

    def __init__(self, num_experts: int, pop_size: int = 20, n_objs: int = 2, lb: float | torch.Tensor | None = None,
                 ub: float | torch.Tensor | None = None, seed: int = 0, device: torch.device | None = None):
        _build(NSGA3, self, num_experts, pop_size, n_objs, lb, ub, seed, device=device)


class MergeMOEAD(_Parentless, MOEAD):
    """MOEA/D (EvoX) over N merge coefficients (evaluates one candidate at a time)."""

    def __init__(self, num_experts: int, pop_size: int = 20, n_objs: int = 2, lb: float | torch.Tensor | None = None,
                 ub: float | torch.Tensor | None = None, seed: int = 0, device: torch.device | None = None):
        _build(MOEAD, self, num_experts, pop_size, n_objs, lb, ub, seed, device=device)


class MergeRVEA(_Parentless, RVEA):
    """RVEA (EvoX) over N merge coefficients; ``max_gen`` should be the run's generations (its angle penalty
    grows with gen / max_gen)."""

    def __init__(self, num_experts: int, pop_size: int = 20, n_objs: int = 2, lb: float | torch.Tensor | None = None,
                 ub: float | torch.Tensor | None = None, seed: int = 0, alpha: float = 2.0, fr: float = 0.1,
                 max_gen: int = 100, device: torch.device | None = None):
        _build(RVEA, self, num_experts, pop_size, n_objs, lb, ub, seed, alpha=alpha, fr=fr, max_gen=max_gen,
               device=device)


class MergeHypE(_Parentless, HypE):
    """HypE (EvoX) over N merge coefficients (Monte Carlo hypervolume contributions from ``n_sample`` draws)."""

    def __init__(self, num_experts: int, pop_size: int = 20, n_objs: int = 2, lb: float | torch.Tensor | None = None,
                 ub: float | torch.Tensor | None = None, seed: int = 0, n_sample: int = 10000,
                 device: torch.device | None = None):
        _build(HypE, self, num_experts, pop_size, n_objs, lb, ub, seed, n_sample=n_sample, device=device)
