"""Static merges that need no search: base, best single expert, model soup, task arithmetic, TIES, DARE.

Linear merges are coefficient vectors in the expert basis (scored by `MergeProblem.evaluate`); TIES and DARE
prune and sign-elect the dense task vectors layer by layer with `peft.utils.merge_utils`, so they produce merged
deltas per target layer (scored by `MergeProblem.evaluate_deltas`). Every tuned hyperparameter (a scaling from a
small grid, the best expert) is chosen on the problem's tasks, i.e. on validation. DELLA, Breadcrumbs, Model Stock,
SLERP / NuSLERP / multi-SLERP, SCE and RankMean (`evox_merge.problems.static_methods`) are registered here too.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from evox_merge.experts.kernel import OPERATORS, operator_delta
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.static_result import DEFAULT_SCALINGS, StaticMerge, on_grid_edge

__all__ = ["DEFAULT_SCALINGS", "STATIC_MERGES", "StaticMerge", "base_model", "best_single_expert", "dense_merge",
           "model_soup", "on_grid_edge", "task_arithmetic", "tune_static_merge"]

def _best_of(problem: MergeProblem, name: str, candidates: torch.Tensor, settings: list[dict]) -> StaticMerge:
    """Score linear candidates ``(C, N)`` and keep the best one on the problem's fitness."""
    scores = problem.evaluate_linear(candidates)
    fitness = problem.aggregate(scores)
    best = int(torch.argmax(fitness))
    return StaticMerge(name, settings[best], scores[best], float(fitness[best]), coefficients=candidates[best])


def base_model(problem: MergeProblem) -> StaticMerge:
    """The base model itself (all coefficients zero)."""
    return _best_of(problem, "base", torch.zeros(1, problem.num_experts), [{}])


def best_single_expert(problem: MergeProblem) -> StaticMerge:
    """The single expert (coefficient 1, others 0) that scores best."""
    candidates = torch.eye(problem.num_experts)
    names = problem.experts.expert_names
    return _best_of(problem, "best_single", candidates, [{"expert": name} for name in names])


def model_soup(problem: MergeProblem) -> StaticMerge:
    """The uniform average of the experts (every coefficient 1/N)."""
    n = problem.num_experts
    return _best_of(problem, "model_soup", torch.full((1, n), 1.0 / n), [{"coefficient": 1.0 / n}])


def task_arithmetic(problem: MergeProblem, scalings: Sequence[float] = DEFAULT_SCALINGS) -> StaticMerge:
    """Task arithmetic: every coefficient equal to one scaling, chosen from `scalings`."""
    candidates = torch.tensor(scalings, dtype=torch.float32).unsqueeze(1).repeat(1, problem.num_experts)
    return _best_of(problem, "task_arithmetic", candidates,
                    [{"scaling": s, "on_grid_edge": on_grid_edge(s, scalings)} for s in scalings])


def operator_deltas(problem: MergeProblem, method: str, scaling: float, density: float) -> dict[str, torch.Tensor]:
    """Merged delta per target layer by a `peft.utils.merge_utils` operator (`evox_merge.experts.kernel.
    operator_delta`), every expert weighted `scaling`."""
    weights = torch.full((problem.num_experts,), scaling)
    return {name: operator_delta(factors, problem.num_experts, method, weights, density)
            for name, factors in problem.experts.targets.items()}


def dense_merge(
    problem: MergeProblem,
    method: str = "ties",
    density: float = 0.2,
    scalings: Sequence[float] = DEFAULT_SCALINGS,
    seed: int = 0,
) -> StaticMerge:
    """TIES (`method="ties"`), DARE (`"dare_linear"`) or DARE-TIES (`"dare_ties"`) over the experts' dense task
    vectors, keeping a `density` fraction of each, with the scaling chosen from `scalings`.

    DARE drops entries at random: the drop masks come from `seed` (the same masks for every scaling), and the
    global RNG is left untouched.
    """
    if method not in OPERATORS:
        raise ValueError(f"method must be one of {OPERATORS}, got {method!r}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")

    def deltas_at(scaling: float) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return operator_deltas(problem, method, scaling, density)

    best: StaticMerge | None = None
    for scaling in scalings:
        scores = problem.evaluate_deltas(deltas_at(scaling))
        fitness = float(problem.aggregate(scores.unsqueeze(0))[0])
        if best is None or fitness > best.fitness:
            settings = {"scaling": scaling, "density": density, "seed": seed,
                        "on_grid_edge": on_grid_edge(scaling, scalings)}
            best = StaticMerge(method, settings, scores, fitness, rebuild=lambda s=scaling: deltas_at(s))
    return best


def tune_static_merge(name: str, problem: MergeProblem, seed: int = 0) -> StaticMerge:
    """The static merge `name` (one of `STATIC_MERGES`) tuned on `problem`; `seed` picks DARE's drop masks."""
    if name not in STATIC_MERGES:
        raise ValueError(f"unknown static merge {name!r}; known: {list(STATIC_MERGES)}")
    return STATIC_MERGES[name](problem, seed)


# Every static merge evox-merge compares a search with, by name (the release, the sweep and the tests use this);
# the names alone, without torch: `evox_merge.problems.static_names.STATIC_MERGE_NAMES`.
STATIC_MERGES: dict[str, Callable[[MergeProblem, int], StaticMerge]] = {
    "base": lambda problem, seed: base_model(problem),
    "best_single": lambda problem, seed: best_single_expert(problem),
    "model_soup": lambda problem, seed: model_soup(problem),
    "task_arithmetic": lambda problem, seed: task_arithmetic(problem),
    "ties": lambda problem, seed: dense_merge(problem, "ties", density=0.2),
    "dare": lambda problem, seed: dense_merge(problem, "dare_ties", density=0.5, seed=seed),
    # The merges of `evox_merge.problems.static_methods` (formulas: `evox_merge.experts.merge_methods`).
    "della": lambda problem, seed: _methods().della(problem, seed=seed),
    "della_linear": lambda problem, seed: _methods().della(problem, seed=seed, linear=True),
    "breadcrumbs": lambda problem, seed: _methods().breadcrumbs(problem),
    "breadcrumbs_ties": lambda problem, seed: _methods().breadcrumbs(problem, ties=True),
    "model_stock": lambda problem, seed: _methods().model_stock(problem),
    "slerp": lambda problem, seed: _methods().interpolation(problem, "slerp"),
    "nuslerp": lambda problem, seed: _methods().interpolation(problem, "nuslerp"),
    "multislerp": lambda problem, seed: _methods().multislerp(problem),
    "sce": lambda problem, seed: _methods().sce(problem),
    "rankmean": lambda problem, seed: _methods().rankmean(problem),
    # The data-aware merges, computed from the problem's task data (`evox_merge.problems.data_aware`, `adamerging`).
    "fisher": lambda problem, seed: _data_aware().fisher(problem),
    "regmean": lambda problem, seed: _data_aware().regmean(problem),
    "adamerging": lambda problem, seed: _adamerging().adamerging(problem),
    "adamerging_layer": lambda problem, seed: _adamerging().adamerging(problem, layer_wise=True),
    "adamerging_supervised": lambda problem, seed: _adamerging().adamerging(problem, objective="supervised"),
}


def _methods():
    """`evox_merge.problems.static_methods`, imported on first use (it imports this module's `StaticMerge`)."""
    from evox_merge.problems import static_methods

    return static_methods


def _data_aware():
    """`evox_merge.problems.data_aware` (Fisher merging, RegMean), imported on first use (it imports this module)."""
    from evox_merge.problems import data_aware

    return data_aware


def _adamerging():
    """`evox_merge.problems.adamerging`, imported on first use (it imports this module's `StaticMerge`)."""
    from evox_merge.problems import adamerging

    return adamerging
