"""Static merges of `evox_merge.experts.merge_methods` over an expert set, and each one tuned on a problem.

Two functions per method: ``<method>_deltas(experts, ...)`` is the merge itself, with given hyperparameters, as a
merged delta per target (a LoRA layer's exact ``delta W``, or a dense parameter): usable alone, e.g.
``write_merge(experts, StaticMerge("della", settings, deltas=...), out)``; ``<method>(problem, seed)`` tunes it
on the problem's tasks (the search part in a run) and returns the best `StaticMerge`, its ``settings`` holding
the chosen values, the ``grid`` tried and ``on_grid_edge``. `evox_merge.problems.static_merges.STATIC_MERGES`
registers the tuned ones by name. Random drops (DELLA) draw from a `torch.Generator` seeded with `seed`, target by
target and expert by expert: the same masks for every grid point, and the global RNG untouched.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Sequence

import torch

from evox_merge.experts import merge_methods as formulas
from evox_merge.experts.expert_set import ExpertSet
from evox_merge.experts.kernel import target_delta, target_task_vectors
from evox_merge.experts.merger import shared_merger
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.static_result import DEFAULT_SCALINGS, StaticMerge, on_grid_edge
from evox_merge.util.layer_names import block_index

Deltas = dict[str, torch.Tensor]

INTERPOLATION_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
"""SLERP's and NuSLERP's ``t`` (0 is the first expert, 1 the second: the best single expert covers both ends)."""
SCE_TOPK_GRID = (0.1, 0.3, 0.5, 1.0)
"""SCE's ``select_topk`` (1.0: no selection)."""


def _each_target(experts: ExpertSet, merge: Callable[[str, torch.Tensor], torch.Tensor]) -> Deltas:
    """``merge(name, task_vectors (N, *shape))`` for every target, in ``experts.target_names`` order."""
    n = experts.num_experts
    return {name: merge(name, target_task_vectors(target, n)) for name, target in experts.targets.items()}


def _scaled(deltas: Deltas, scaling: float) -> Deltas:
    """Every delta times `scaling` (the last operation of mergekit's generalized task arithmetic)."""
    return deltas if scaling == 1 else {name: delta * scaling for name, delta in deltas.items()}


def della_deltas(experts: ExpertSet, density: float = 0.5, epsilon: float = 0.15, seed: int = 0,
                 linear: bool = False, rescale: str = "probability") -> Deltas:
    """DELLA (arXiv 2406.11617) at scaling 1: each expert's task vector pruned by `merge_methods.magprune` (masks from
    a generator seeded with `seed`), then TIES' sign election and disjoint mean (``linear=False``: mergekit's
    ``della``) or their sum (``linear=True``: ``della_linear``)."""
    formulas.check_della(density, epsilon)
    generators: dict[torch.device, torch.Generator] = {}  # one stream per device the targets live on
    weights = torch.ones(experts.num_experts)

    def merge(name: str, tv: torch.Tensor) -> torch.Tensor:
        if tv.device not in generators:
            generators[tv.device] = torch.Generator(device=tv.device).manual_seed(seed)
        generator = generators[tv.device]
        pruned = torch.stack([formulas.magprune(t, density, epsilon, generator, rescale) for t in tv])
        return formulas.combine(pruned, weights, elect=not linear, normalize=not linear)

    return _each_target(experts, merge)


def breadcrumbs_deltas(experts: ExpertSet, density: float = 0.2, gamma: float = 0.01, ties: bool = False) -> Deltas:
    """Model Breadcrumbs (arXiv 2312.06795) at scaling 1: each task vector keeps the band `merge_methods.
    breadcrumbs_prune` leaves (no outliers, no small entries), summed (``breadcrumbs``) or summed over the entries
    that agree with the elected sign (``ties=True``: mergekit's ``breadcrumbs_ties``, which does not divide)."""
    formulas.check_fraction("density", density)
    formulas.check_fraction("gamma", gamma, low_open=False)
    weights = torch.ones(experts.num_experts)

    def merge(name: str, tv: torch.Tensor) -> torch.Tensor:
        pruned = torch.stack([formulas.breadcrumbs_prune(t, density, gamma) for t in tv])
        return formulas.combine(pruned, weights, elect=ties, normalize=False)

    return _each_target(experts, merge)


def model_stock_deltas(experts: ExpertSet) -> Deltas:
    """Model Stock (arXiv 2403.19522): per target, the experts' mean task vector times the ratio
    `merge_methods.model_stock_ratio` of their pairwise angles (no hyperparameter)."""
    return _each_target(experts, lambda name, tv: formulas.model_stock_delta(tv))


def _pair(experts: ExpertSet, pair: Sequence[int] | None, method: str) -> tuple[int, int]:
    if pair is None:
        if experts.num_experts != 2:
            raise ValueError(f"{method} interpolates two experts; this set has {experts.num_experts}: name the "
                             "pair (pair=(i, j))")
        return 0, 1
    i, j = (int(k) for k in pair)
    if i == j or not (0 <= i < experts.num_experts and 0 <= j < experts.num_experts):
        raise ValueError(f"{method}: pair must be two different expert indices below {experts.num_experts}, "
                         f"got {tuple(pair)}")
    return i, j


def slerp_deltas(experts: ExpertSet, t: float, pair: Sequence[int] | None = None) -> Deltas:
    """SLERP of two experts' weights (mergekit 0.1.5's ``slerp``, the first expert as its base model): per target,
    `merge_methods.slerp` from ``W0 + tau_i`` (``t = 0``) to ``W0 + tau_j`` (``t = 1``), minus ``W0``. `pair`:
    the experts ``(i, j)`` (default: the set's two)."""
    i, j = _pair(experts, pair, "slerp")
    merger = shared_merger(experts)

    def merge(name: str, tv: torch.Tensor) -> torch.Tensor:
        w0 = merger.original(name).to(tv)
        return formulas.slerp(t, w0 + tv[i], w0 + tv[j]).to(tv) - w0

    return _each_target(experts, merge)


def nuslerp_deltas(experts: ExpertSet, t: float, pair: Sequence[int] | None = None) -> Deltas:
    """NuSLERP of two experts' task vectors around the base (mergekit 0.1.5's ``nuslerp`` with a base model,
    flattened; ``t = w_j / (w_i + w_j)``): `merge_methods.nuslerp` per target."""
    i, j = _pair(experts, pair, "nuslerp")
    return _each_target(experts, lambda name, tv: formulas.nuslerp(t, tv[i], tv[j]))


def multislerp_deltas(experts: ExpertSet, weights: Sequence[float] | None = None) -> Deltas:
    """Multi-SLERP of the N task vectors around the base (mergekit 0.1.5's ``multislerp`` with a base model),
    equal weights unless given: `merge_methods.multislerp` per target."""
    w = torch.tensor(weights if weights is not None else [1.0] * experts.num_experts, dtype=torch.float32)
    if w.shape != (experts.num_experts,) or not torch.isfinite(w).all() or float(w.sum()) == 0:
        raise ValueError(f"multislerp: weights must be {experts.num_experts} finite numbers with a nonzero sum, "
                         f"got {weights}")
    return _each_target(experts, lambda name, tv: formulas.multislerp(tv, w))


def sce_deltas(experts: ExpertSet, select_topk: float = 1.0) -> Deltas:
    """SCE (arXiv 2408.07990; mergekit 0.1.5's ``sce``): `merge_methods.sce_delta` per target."""
    formulas.check_fraction("select_topk", select_topk)
    return _each_target(experts, lambda name, tv: formulas.sce_delta(tv, select_topk))


def _block_group(name: str) -> tuple[str, int] | None:
    """A target's transformer block as ``(the stack's name, index)`` (``encoder.block``/``decoder.block`` apart),
    None outside the blocks (embeddings, the output layer, the final norm)."""
    index = block_index(name)
    if index is None:
        return None
    return name[: name.find(f".{index}.")] if f".{index}." in name else "", index


def rankmean_weights_of(experts: ExpertSet) -> tuple[dict[str, torch.Tensor], dict]:
    """RankMean's coefficients per target ``(N,)`` (`merge_methods.rankmean_weights` over the transformer blocks,
    each expert's change in a block the sum of its task vectors' absolute entries over the block's targets;
    ``1/N`` each outside the blocks) and the ranks' inputs for the settings."""
    n = experts.num_experts
    groups, totals = {}, {}
    for name, target in experts.targets.items():
        group = _block_group(name)
        groups[name] = group
        if group is not None:
            change = target_task_vectors(target, n).abs().reshape(n, -1).sum(dim=1).double().cpu()
            totals[group] = totals.get(group, torch.zeros(n, dtype=torch.float64)) + change
    order = list(totals)
    weights = formulas.rankmean_weights(torch.stack([totals[g] for g in order], dim=1)) if order else None
    per_target = {name: (torch.full((n,), 1.0 / n) if group is None else
                         weights[:, order.index(group)].float()) for name, group in groups.items()}
    return per_target, {"blocks": len(order)}


def rankmean_deltas(experts: ExpertSet) -> Deltas:
    """RankMean (Perin et al., ACL Findings 2024): per target, ``sum_i p_i(block) tau_i`` with `rankmean_weights_of`'s
    coefficients (the kernel's linear merge of the target, `target_delta`)."""
    per_target, _ = rankmean_weights_of(experts)
    return {name: target_delta(target, per_target[name]) for name, target in experts.targets.items()}


def tune(problem: MergeProblem, name: str, grid: dict[str, Sequence], fixed: dict,
         deltas_at: Callable[..., Deltas], operator: str,
         rebuild_at: Callable[..., Deltas] | None = None, hold: bool = False) -> StaticMerge:
    """Score ``deltas_at(**point)`` for every point of `grid` (its values' product, in order) on `problem` and keep
    the best (the first on ties); ``settings``: the point, `fixed`, the ``grid``, whether a tuned value is at the
    grid's edge, and the ``operator`` in words (recipe.json's ``release.operator``). The merge holds no deltas: its
    ``rebuild`` recomputes them at the chosen point with `rebuild_at` (default `deltas_at`; give one that does not
    close over tensors cached for the tuning, so that they are freed with it). ``hold=True`` keeps the chosen
    point's deltas instead (Fisher, RegMean: rebuilding them would keep their data statistics alive)."""
    best: StaticMerge | None = None
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        deltas = deltas_at(**point)
        scores = problem.evaluate_deltas(deltas)
        fitness = float(problem.aggregate(scores.unsqueeze(0))[0])
        if best is None or fitness > best.fitness or (math.isnan(best.fitness) and not math.isnan(fitness)):
            edge = any(on_grid_edge(point[k], grid[k]) for k in keys)
            settings = {**point, **fixed, "grid": {k: list(grid[k]) for k in keys}, "on_grid_edge": edge,
                        "operator": operator + " on each target's exact task vectors (a LoRA layer's s_i B_i A_i, "
                                               "a dense parameter's theta_i - theta_0)"}
            best = (StaticMerge(name, settings, scores, fitness, deltas=deltas) if hold else
                    StaticMerge(name, settings, scores, fitness,
                                rebuild=functools.partial(rebuild_at or deltas_at, **point)))
        del deltas
    return best


def della(problem: MergeProblem, seed: int = 0, linear: bool = False, density: float = 0.5, epsilon: float = 0.15,
          scalings: Sequence[float] = DEFAULT_SCALINGS) -> StaticMerge:
    """DELLA (``della``) or DELLA-linear (``della_linear``) with the scaling chosen from `scalings` (the masks drawn
    once, from `seed`)."""
    unscaled = della_deltas(problem.experts, density, epsilon, seed, linear=linear)
    return tune(problem, "della_linear" if linear else "della", {"scaling": scalings},
                {"density": density, "epsilon": epsilon, "rescale": "probability", "seed": seed},
                lambda scaling: _scaled(unscaled, scaling),
                f"DELLA{'-linear' if linear else ''} (arXiv 2406.11617): MagPrune, then "
                f"{'a sum' if linear else 'sign election and disjoint mean'}, times the scaling",
                lambda scaling: _scaled(della_deltas(problem.experts, density, epsilon, seed, linear=linear), scaling))


def breadcrumbs(problem: MergeProblem, ties: bool = False, density: float = 0.2, gamma: float = 0.01,
                scalings: Sequence[float] = DEFAULT_SCALINGS) -> StaticMerge:
    """Model Breadcrumbs (``breadcrumbs``) or its TIES form (``breadcrumbs_ties``), scaling chosen from `scalings`."""
    unscaled = breadcrumbs_deltas(problem.experts, density, gamma, ties=ties)
    return tune(problem, "breadcrumbs_ties" if ties else "breadcrumbs", {"scaling": scalings},
                {"density": density, "gamma": gamma}, lambda scaling: _scaled(unscaled, scaling),
                f"Model Breadcrumbs (arXiv 2312.06795): outliers and small entries dropped, then a sum"
                f"{' over the entries of the elected sign' if ties else ''}, times the scaling",
                lambda scaling: _scaled(breadcrumbs_deltas(problem.experts, density, gamma, ties=ties), scaling))


def model_stock(problem: MergeProblem) -> StaticMerge:
    """Model Stock (nothing to tune: one evaluation)."""
    return tune(problem, "model_stock", {}, {}, lambda: model_stock_deltas(problem.experts),
                "Model Stock (arXiv 2403.19522): t mean_i tau_i, t from the task vectors' angles")


def best_pair(problem: MergeProblem) -> tuple[int, int]:
    """The two experts a two-expert merge interpolates: the set's two, or of more, the two best single experts on
    `problem` (the better one first; the first listed on ties)."""
    if problem.num_experts == 2:
        return 0, 1
    fitness = problem.aggregate(problem.evaluate_linear(torch.eye(problem.num_experts)))
    order = sorted(range(problem.num_experts), key=lambda i: (-float(fitness[i]), i))
    return order[0], order[1]


def interpolation(problem: MergeProblem, method: str, ts: Sequence[float] = INTERPOLATION_GRID) -> StaticMerge:
    """SLERP (``method="slerp"``) or NuSLERP (``"nuslerp"``) of two experts (`best_pair`), ``t`` chosen from
    `ts`."""
    pair = best_pair(problem)
    make = slerp_deltas if method == "slerp" else nuslerp_deltas
    names = problem.experts.expert_names
    return tune(problem, method, {"t": ts}, {"experts": [names[pair[0]], names[pair[1]]]},
                lambda t: make(problem.experts, t, pair),
                "SLERP of two experts' weights" if method == "slerp" else "NuSLERP of two experts' task vectors")


def multislerp(problem: MergeProblem) -> StaticMerge:
    """Multi-SLERP with equal weights (nothing to tune: one evaluation)."""
    return tune(problem, "multislerp", {}, {"weights": "equal"}, lambda: multislerp_deltas(problem.experts),
                "multi-SLERP of the task vectors (mergekit's)")


def sce(problem: MergeProblem, topks: Sequence[float] = SCE_TOPK_GRID) -> StaticMerge:
    """SCE with ``select_topk`` chosen from `topks`."""
    return tune(problem, "sce", {"select_topk": topks}, {},
                lambda select_topk: sce_deltas(problem.experts, select_topk),
                "SCE (arXiv 2408.07990): select by variance, weigh by squares, erase minority signs")


def rankmean(problem: MergeProblem) -> StaticMerge:
    """RankMean (nothing to tune: one evaluation)."""
    _, facts = rankmean_weights_of(problem.experts)
    return tune(problem, "rankmean", {}, facts, lambda: rankmean_deltas(problem.experts),
                "RankMean (Perin et al. 2024): per block, coefficients r_i / sum_j r_j from each expert's rank of "
                "its change")
