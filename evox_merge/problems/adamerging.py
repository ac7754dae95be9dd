"""AdaMerging (arXiv 2310.02575): merge coefficients learned by gradient descent on a problem's task data (the
search part in a run).

The merged model ``W = W0 + sum_i c_i tau_i`` per target is differentiable in the coefficients: a LoRA layer's delta
is ``(B_scaled * c[expert_of_rank]) @ A_cat`` (the kernel's `merged_factors`), a dense target's ``sum_i c_i tau_i``
over its task vectors; the model runs with these weights through `torch.func.functional_call` (its own weights are
not touched and need no gradient). Task-wise AdaMerging learns one coefficient per expert ``(N,)``, layer-wise one
per expert and target ``(L, N)`` (``L`` the experts' targets, in ``target_names`` order). A few Adam steps, each on
the whole objective (gradients accumulated batch by batch: deterministic), each followed by clipping the
coefficients into the search box (`evox_merge.algorithms.limits` ``DEFAULT_LB``/``DEFAULT_UB``, the box every
search's candidates lie in). Objectives (`evox_merge.problems.data_objectives`): ``entropy``, the paper's, on the
unlabelled inputs; ``supervised``, the labelled loss on the search part. Each task's term is its mean over examples
(or tokens), the tasks weighted by the problem's task weights.

Departures from the paper: a handful of full-data steps (the paper: 500 steps of batches of 16 test images) with a
larger step (Adam, lr 0.05 instead of 1e-3), so that tiny models finish in seconds; the prior (initial coefficient)
0.3 is the paper's; the learned coefficients are the merge (no pick among steps).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from evox_merge.algorithms.limits import DEFAULT_LB, DEFAULT_UB
from evox_merge.experts.expert_set import ExpertSet
from evox_merge.experts.kernel import LayerFactors, merged_factors, target_delta, target_task_vectors
from evox_merge.experts.merger import shared_merger
from evox_merge.problems.data_objectives import (OBJECTIVES, ObjectiveBatch, batch_terms, gradients_for,
                                                 objective_batches, task_denominators)
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.static_result import StaticMerge
from evox_merge.util.errors import MergeInputError

ADAMERGING_STEPS = 10
"""Adam steps of the registered AdaMerging merges (each one pass over the search part, forward and backward)."""
ADAMERGING_LR = 0.05
"""Their Adam learning rate."""
ADAMERGING_INIT = 0.3
"""Their initial coefficient (the paper's prior lambda = 0.3)."""


def check_settings(method: str, steps: int, lr: float, init: float, objective: str, lb: float, ub: float) -> None:
    """Refuse a setting AdaMerging cannot run with, naming `method` and the key."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MergeInputError(f"{method}: steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise MergeInputError(f"{method}: lr must be a finite number > 0, got {lr!r}")
    if objective not in OBJECTIVES:
        raise MergeInputError(f"{method}: objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if not (math.isfinite(lb) and math.isfinite(ub) and lb < ub):
        raise MergeInputError(f"{method}: the box must have finite lb < ub, got [{lb}, {ub}]")
    if not (isinstance(init, (int, float)) and lb <= init <= ub):
        raise MergeInputError(f"{method}: init must be a number inside the box [{lb}, {ub}], got {init!r}")


class DifferentiableMerge:
    """The merged target parameters ``W0 + delta(c)`` as a function of coefficients ``c`` ``(N,)`` or ``(L, N)``,
    differentiable in ``c`` (for `torch.func.functional_call`)."""

    def __init__(self, experts: ExpertSet) -> None:
        self.experts = experts
        merger = shared_merger(experts)
        merger.restore()
        self.parameter_names = {name: (name if name in experts.dense else f"{name}.weight")
                                for name in experts.target_names}
        self.originals = {self.parameter_names[name]: merger.original(name).detach()
                          for name in experts.target_names if name in experts.layers or not self._on_top(name)}
        self.dense_vectors = {name: target_task_vectors(target, experts.num_experts).detach()
                              for name, target in experts.dense.items()}

    def _on_top(self, name: str) -> bool:
        """A dense ``<layer>.weight`` that a LoRA layer also targets (the LoRA target holds ``W0``)."""
        return name.endswith(".weight") and name[: -len(".weight")] in self.experts.layers

    def parameters(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter name -> merged value for `coefficients` ``(N,)`` (every target) or ``(L, N)`` (per target)."""
        values = dict(self.originals)
        for index, name in enumerate(self.experts.target_names):
            c = coefficients[index] if coefficients.ndim == 2 else coefficients
            target = self.experts.targets[name]
            if isinstance(target, LayerFactors):
                a, b = merged_factors(target, c)
                delta = b @ a
            else:
                tau = self.dense_vectors[name]
                delta = (c.to(tau).reshape((-1,) + (1,) * (tau.dim() - 1)) * tau).sum(0)
            key = self.parameter_names[name]
            values[key] = values[key] + delta.to(values[key].dtype)
        return values


def objective_value(problem: MergeProblem, merge: DifferentiableMerge, coefficients: torch.Tensor,
                    batches: Sequence[ObjectiveBatch], objective: str, backward: bool = False) -> float:
    """The weighted objective of the merge `coefficients` on `batches` (each task's mean term, weighted by the
    problem's task weights); with `backward`, the coefficients' gradient is accumulated batch by batch."""
    denominators = task_denominators(batches, objective, len(problem.tasks))
    weights = problem.task_weights
    total = 0.0
    model = problem.experts.model
    for batch in batches:
        numerators, _ = batch_terms(model, batch, objective, merge.parameters(coefficients))
        loss = numerators.sum() * float(weights[batch.task] / denominators[batch.task])
        if backward:
            loss.backward()
        total += float(loss.detach())
    return total


def learn_coefficients(problem: MergeProblem, layer_wise: bool = False, objective: str = "entropy",
                       steps: int = ADAMERGING_STEPS, lr: float = ADAMERGING_LR, init: float = ADAMERGING_INIT,
                       lb: float = DEFAULT_LB, ub: float = DEFAULT_UB,
                       rows_per_batch: int = 8) -> tuple[torch.Tensor, list[float]]:
    """AdaMerging's coefficients on `problem`'s tasks: ``(N,)`` task-wise or ``(L, N)`` layer-wise, and the
    objective before each step and after the last (``steps + 1`` values)."""
    method = "adamerging_layer" if layer_wise else "adamerging"
    check_settings(method, steps, lr, init, objective, lb, ub)
    experts = problem.experts
    batches = objective_batches(problem, rows_per_batch=rows_per_batch)
    if not batches:
        raise MergeInputError(f"{method}: the problem's tasks have no example with a target to score")
    shape = (len(experts.target_names), experts.num_experts) if layer_wise else (experts.num_experts,)
    coefficients = torch.full(shape, float(init), dtype=torch.float32, requires_grad=True)
    optimiser = torch.optim.Adam([coefficients], lr=lr)
    merge = DifferentiableMerge(experts)
    history = []
    with gradients_for(experts.model):
        for _ in range(steps):
            optimiser.zero_grad()
            history.append(objective_value(problem, merge, coefficients, batches, objective, backward=True))
            optimiser.step()
            with torch.no_grad():
                coefficients.clamp_(lb, ub)
        with torch.no_grad():
            history.append(objective_value(problem, merge, coefficients, batches, objective))
    return coefficients.detach().clone(), history


def adamerging(problem: MergeProblem, layer_wise: bool = False, objective: str = "entropy",
               steps: int = ADAMERGING_STEPS, lr: float = ADAMERGING_LR, init: float = ADAMERGING_INIT,
               lb: float = DEFAULT_LB, ub: float = DEFAULT_UB) -> StaticMerge:
    """AdaMerging on `problem` (module docstring), scored on it. Named ``adamerging`` (task-wise),
    ``adamerging_layer``, and with ``objective="supervised"`` ``adamerging_supervised`` (task-wise) or
    ``adamerging_layer_supervised``.

    The merge is returned as its merged delta per target (``deltas``), the learned coefficients in ``settings``: a
    task-wise merge is linear, but as deltas it does not join the linear static merges that ``algorithm.start:
    static`` starts a search from (`evox_merge.run.registry.start_points`), which it would change for every search
    (a choice left to that feature's owner)."""
    name = ("adamerging_layer" if layer_wise else "adamerging") + ("_supervised" if objective == "supervised" else "")
    coefficients, history = learn_coefficients(problem, layer_wise, objective, steps, lr, init, lb, ub)
    settings = {"objective": objective, "wise": "layer" if layer_wise else "task", "steps": steps, "lr": lr,
                "init": init, "box": [lb, ub], "objective_start": history[0], "objective_end": history[-1],
                "objective_history": history, "coefficients": coefficients.tolist(),
                "operator": f"AdaMerging (arXiv 2310.02575), {'layer' if layer_wise else 'task'}-wise: coefficients "
                            f"learned by {steps} Adam steps on the search part's "
                            f"{'entropy (unlabelled)' if objective == 'entropy' else 'supervised loss'}"}
    def deltas() -> dict[str, torch.Tensor]:
        return {target_name: target_delta(target, coefficients[i] if layer_wise else coefficients)
                for i, (target_name, target) in enumerate(problem.experts.targets.items())}

    scores = problem.evaluate_deltas(deltas())
    fitness = float(problem.aggregate(scores.unsqueeze(0))[0])
    return StaticMerge(name, settings, scores, fitness, rebuild=deltas)
