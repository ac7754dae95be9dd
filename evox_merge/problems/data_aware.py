"""Data-aware static merges computed from a problem's task data (the search part in a run): Fisher merging and
RegMean. AdaMerging, which learns coefficients, is in `evox_merge.problems.adamerging`.

Both work on each merge target's exact task vectors (a LoRA layer's ``s_i B_i A_i``, a dense parameter's
``theta_i - theta_0``: `evox_merge.experts.kernel.target_delta` with a one-hot), with expert ``i`` merged alone
(coefficient 1) while its statistics are gathered, and both stream: one expert's statistics at a time are folded
into running sums the size of the targets, so memory does not grow with the number of experts or examples.

- Fisher merging (arXiv 2111.09832): the diagonal empirical Fisher ``F_i`` of each expert, the mean over examples of
  the squared gradient of the example's target log-likelihood (`evox_merge.problems.data_objectives`, ``loglik``)
  per entry of every target; each ``F_i`` divided by its L2 norm over all targets and floored at `FISHER_FLOOR`
  (FusionBench's ``normalize_fisher_weight`` and ``minimal_fisher_weight``), then per entry
  ``delta = sum_i F_i tau_i / sum_i F_i`` (`fisher_weighted_delta`).
- RegMean (arXiv 2212.09849): per target Linear layer, each expert's Gram matrix ``G_i = X_i^T X_i`` of the layer's
  inputs over the data's real (unpadded) tokens; the off-diagonal entries scaled by ``alpha``; closed form
  ``W = (sum_i G_i W_i^T)^T (sum_i G_i)^-1`` (`regmean_delta`). A target that is not a Linear weight (a norm, an
  embedding) gets the plain mean of the task vectors (the paper's rule for non-linear weights).

Departure from both papers: the merge is multiplied by a ``scaling`` chosen on the problem from a recorded grid
(1.0 is the paper's merge); a LoRA expert's delta is a small fraction of the weight, so a weighted *mean* of N of
them is often too weak where task arithmetic's best scaling of their *sum* is about 1.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from evox_merge.experts.expert_set import ExpertSet
from evox_merge.experts.kernel import target_delta
from evox_merge.experts.merger import shared_merger
from evox_merge.problems.data_objectives import batch_terms, gradients_for, objective_batches
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.static_methods import tune
from evox_merge.problems.static_result import StaticMerge
from evox_merge.util.errors import MergeInputError

Deltas = dict[str, torch.Tensor]

DATA_AWARE_SCALINGS = (1.0, 2.0, 3.0, 4.0)
"""The scaling grid of Fisher merging and RegMean (multiples of the merged delta; 1.0: the paper's merge)."""
REGMEAN_ALPHAS = (0.3, 0.6, 0.9)
"""RegMean's off-diagonal scale ``alpha`` tried (the paper tunes it in [0, 1]; 1 is the unshrunk Gram matrix)."""
FISHER_FLOOR = 1e-6
"""Added to every normalised Fisher entry, so that an entry no expert's gradient reaches gets the plain mean."""


def _one_hot(experts: ExpertSet, i: int) -> torch.Tensor:
    return torch.eye(experts.num_experts)[i]


def _task_vector(experts: ExpertSet, name: str, i: int) -> torch.Tensor:
    """Expert `i`'s task vector of target `name` (float32, on the target's device)."""
    return target_delta(experts.targets[name], _one_hot(experts, i)).float()


class _TaskVectors:
    """Expert `i`'s task vectors by target name, each formed when asked for (not all at once)."""

    def __init__(self, experts: ExpertSet, i: int) -> None:
        self.experts, self.i = experts, i

    def __getitem__(self, name: str) -> torch.Tensor:
        return _task_vector(self.experts, name, self.i)


def _target_parameters(experts: ExpertSet) -> dict[str, torch.nn.Parameter]:
    """Each target's parameter (a LoRA layer's weight, a dense target's parameter; two targets may share one)."""
    return {name: experts.target_weight(name) for name in experts.target_names}


class FisherSums:
    """Running sums ``sum_i F_i tau_i`` and ``sum_i F_i`` per target, float32 (`add` one expert at a time)."""

    def __init__(self, floor: float = FISHER_FLOOR) -> None:
        if not (math.isfinite(floor) and floor > 0):
            raise MergeInputError(f"fisher: floor must be a finite number > 0, got {floor}")
        self.floor = floor
        self.weighted: Deltas = {}
        self.total: Deltas = {}

    def add(self, fisher: Deltas, task_vectors: "Deltas | _TaskVectors", where: str = "") -> None:
        """Fold one expert's Fisher (per target, any scale: normalised here to unit L2 norm over all targets) and
        its task vectors in. Raises MergeInputError (naming `where`) on a NaN or negative Fisher entry."""
        squares = 0.0
        for name, values in fisher.items():
            if not torch.isfinite(values).all() or bool((values < 0).any()):
                raise MergeInputError(f"fisher: the Fisher of {where or 'an expert'} for target {name!r} has NaN, "
                                      "infinite or negative entries; expected squared gradients (finite, >= 0)")
            squares += float(values.double().square().sum())
        norm = math.sqrt(squares) if squares > 0 else 1.0
        for name, values in fisher.items():  # float32 sums: the size of the targets, twice
            weight = values.float() / norm + self.floor
            if name in self.weighted:
                self.weighted[name].addcmul_(weight, task_vectors[name].float())
                self.total[name] += weight
            else:
                self.weighted[name] = weight * task_vectors[name].float()
                self.total[name] = weight

    def deltas(self) -> Deltas:
        """The Fisher-weighted mean per target, float32."""
        return {name: self.weighted[name] / self.total[name] for name in self.weighted}


def fisher_weighted_delta(task_vectors: torch.Tensor, fishers: torch.Tensor,
                          floor: float = FISHER_FLOOR) -> torch.Tensor:
    """One target's Fisher merge of ``task_vectors (N, *shape)`` with ``fishers (N, *shape)`` (each expert's
    normalised to unit norm over this target, then floored: `FisherSums`)."""
    if task_vectors.shape != fishers.shape:
        raise MergeInputError(f"fisher: fishers must have the task vectors' shape {tuple(task_vectors.shape)}, got "
                              f"{tuple(fishers.shape)}")
    sums = FisherSums(floor)
    for i in range(task_vectors.shape[0]):
        sums.add({"target": fishers[i]}, {"target": task_vectors[i]}, where=f"expert {i}")
    return sums.deltas()["target"]


def expert_fisher(problem: MergeProblem, expert: int, batches: list | None = None) -> Deltas:
    """The diagonal empirical Fisher of expert `expert` (merged alone) per target of `problem`'s experts: the mean
    over the problem's examples of the squared gradient of each example's log-likelihood (one backward pass per
    example)."""
    experts = problem.experts
    batches = batches if batches is not None else objective_batches(problem, one_example=True)
    parameters = _target_parameters(experts)
    unique = list({id(p): p for p in parameters.values()}.values())
    sums = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in unique}
    merger = shared_merger(experts)
    count = 0
    try:
        merger.apply(_one_hot(experts, expert))
        with gradients_for(experts.model, unique):
            for batch in batches:
                numerators, _ = batch_terms(experts.model, batch, "loglik")
                for value in numerators:  # one example per batch: value is that example's log-likelihood
                    for parameter in unique:
                        parameter.grad = None
                    value.backward(retain_graph=len(numerators) > 1)
                    for parameter in unique:
                        if parameter.grad is not None:
                            sums[id(parameter)] += parameter.grad.float().square()
                    count += 1
    finally:
        merger.restore()
    if count == 0:
        raise MergeInputError("fisher: the problem's tasks have no example with a target to score")
    for total in sums.values():
        total /= count
    return {name: sums[id(parameter)] for name, parameter in parameters.items()}


def fisher_deltas(problem: MergeProblem, floor: float = FISHER_FLOOR, batches: list | None = None) -> Deltas:
    """Fisher merging of `problem`'s experts on its tasks' examples (`batches`: theirs, one example each), at
    scaling 1 (module docstring)."""
    sums = FisherSums(floor)
    batches = batches if batches is not None else objective_batches(problem, one_example=True)
    experts = problem.experts
    for i, name in enumerate(experts.expert_names):
        fisher = expert_fisher(problem, i, batches)
        sums.add(fisher, _TaskVectors(experts, i), where=f"expert {name!r}")  # each formed when folded in
    return sums.deltas()


class RegMeanSums:
    """Per target, the running sums RegMean's closed form needs for any ``alpha``: ``sum_i G_i`` (in, in) and
    ``sum_i tau_i G_i`` (out, in), float32, and each expert's ``diag(G_i)`` (in,); the diagonal terms
    ``sum_i tau_i diag(G_i)`` are formed when solving, from `task_vector` ``(target, expert) -> tau``, so the sums
    stay two tensors per target whatever the number of experts."""

    def __init__(self, task_vector: Callable[[str, int], torch.Tensor]) -> None:
        self.task_vector = task_vector
        self.gram: Deltas = {}
        self.product: Deltas = {}
        self.diagonals: dict[str, list[torch.Tensor]] = {}
        self.experts = 0

    def add(self, grams: Deltas, where: str = "") -> None:
        """Fold the next expert's Gram matrices in (per target). Raises MergeInputError (naming the target and
        `where`) on a Gram matrix that is not square of the target's input size, or not finite."""
        expert = self.experts
        for name, gram in grams.items():
            tau = self.task_vector(name, expert).float()
            if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or tau.ndim != 2 or tau.shape[1] != gram.shape[0]:
                raise MergeInputError(f"regmean: gram[{name!r}] of {where or 'an expert'} must be (in, in) = "
                                      f"({tau.shape[-1]}, {tau.shape[-1]}) for a task vector of shape "
                                      f"{tuple(tau.shape)}, got {tuple(gram.shape)}")
            if not torch.isfinite(gram).all():
                raise MergeInputError(f"regmean: gram[{name!r}] of {where or 'an expert'} has NaN or infinite "
                                      "entries (non-finite activations); expected a finite Gram matrix X^T X")
            gram = gram.float()
            if name in self.gram:
                self.gram[name] += gram
                self.product[name].addmm_(tau, gram)
            else:
                self.gram[name], self.product[name] = gram.clone(), tau @ gram
            self.diagonals.setdefault(name, []).append(gram.diagonal().double().cpu())
        self.experts += 1

    def deltas(self, alpha: float) -> Deltas:
        """Per target, ``(alpha M + (1 - alpha) M_diag) (alpha S + (1 - alpha) S_diag)^-1`` (M: ``sum_i tau_i G_i``,
        S: ``sum_i G_i``, ``_diag`` their diagonal-only forms), solved in float64; an input that never occurs (a
        zero diagonal) takes the plain mean of the task vectors' columns there. float32."""
        check_alpha(alpha)
        out = {}
        for name, gram in self.gram.items():
            diagonals = self.diagonals[name]
            total = torch.stack(diagonals).sum(0).to(gram.device)
            system = alpha * gram.double() + (1 - alpha) * torch.diag(total)
            right = alpha * self.product[name].double()
            dead = total <= 0
            if alpha < 1 or dead.any():
                taus = [self.task_vector(name, i).double() for i in range(self.experts)]
                if alpha < 1:
                    right += (1 - alpha) * sum(tau * d.to(tau.device) for tau, d in zip(taus, diagonals))
            if dead.any():
                system[dead] = 0
                system[:, dead] = 0
                system[dead, dead] = 1
            try:
                solved = torch.linalg.solve(system, right.T).T  # the system is symmetric
            except RuntimeError:  # singular: the least-squares solution
                solved = torch.linalg.lstsq(system, right.T).solution.T
            if dead.any():
                solved[:, dead] = (sum(taus) / self.experts)[:, dead]
            out[name] = solved.float()
        return out


def check_alpha(alpha: float) -> None:
    """RegMean's ``alpha`` must be in ``(0, 1]`` (0 would drop the inputs' correlations altogether: a
    diagonal-weighted mean, still well defined, but not RegMean)."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0 < alpha <= 1):
        raise MergeInputError(f"regmean: alpha must be a number in (0, 1], got {alpha!r}")


def regmean_delta(task_vectors: torch.Tensor, grams: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """One Linear target's RegMean merge of ``task_vectors (N, out, in)`` with the experts' Gram matrices ``grams
    (N, in, in)`` (`RegMeanSums`)."""
    check_alpha(alpha)
    sums = RegMeanSums(lambda name, i: task_vectors[i])
    for i in range(task_vectors.shape[0]):
        sums.add({"target": grams[i]}, where=f"expert {i}")
    return sums.deltas(alpha)["target"]


def _linear_modules(experts: ExpertSet) -> dict[str, torch.nn.Linear]:
    """The targets that are Linear layers' weights (LoRA layers; a dense ``<module>.weight`` of a Linear), by
    target name."""
    modules = {name: experts.target_module(name) for name in experts.layers}
    for name in experts.dense:
        if name.endswith(".weight"):
            module = experts.model.get_submodule(name[: -len(".weight")])
            if isinstance(module, torch.nn.Linear):
                modules[name] = module
    return modules


@torch.no_grad()
def expert_grams(problem: MergeProblem, expert: int, batches: list | None = None) -> Deltas:
    """Expert `expert`'s (merged alone) Gram matrix ``X^T X`` of every Linear target's inputs over the real tokens
    of `problem`'s examples, float32, accumulated batch by batch (no activation is kept)."""
    experts = problem.experts
    seq2seq = bool(getattr(experts.model.config, "is_encoder_decoder", False))
    batches = batches if batches is not None else objective_batches(problem, one_row=seq2seq)
    modules = _linear_modules(experts)
    grams: dict[int, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def hook(module, inputs) -> None:
        x = inputs[0]
        mask = current["mask"]
        if x.shape[:-1] == mask.shape:
            x = x[mask]
        elif x.shape[0] != 1:  # an encoder-decoder's padded batch: batches of one row have no padding
            raise RuntimeError(f"regmean: cannot tell the real tokens of an input of shape {tuple(x.shape)}")
        x = x.reshape(-1, x.shape[-1]).float()
        key = id(module)
        if key in grams:
            grams[key].addmm_(x.T, x)
        else:
            grams[key] = x.T @ x

    handles = [module.register_forward_pre_hook(hook) for module in {id(m): m for m in modules.values()}.values()]
    merger = shared_merger(experts)
    try:
        merger.apply(_one_hot(experts, expert))
        for batch in batches:
            current["mask"] = batch.attention_mask.bool()
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            if batch.decoder_input_ids is not None:
                inputs.update(decoder_input_ids=batch.decoder_input_ids)
            experts.model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        merger.restore()
    return {name: grams.get(id(module), torch.zeros(module.in_features, module.in_features,
                                                    device=module.weight.device))
            for name, module in modules.items()}


def regmean_sums(problem: MergeProblem) -> RegMeanSums:
    """`RegMeanSums` of `problem`'s experts over its tasks' examples (one expert's Gram matrices at a time)."""
    experts = problem.experts
    sums = RegMeanSums(lambda target, i: _task_vector(experts, target, i))
    seq2seq = bool(getattr(experts.model.config, "is_encoder_decoder", False))
    batches = objective_batches(problem, one_row=seq2seq)
    for i, name in enumerate(experts.expert_names):
        sums.add(expert_grams(problem, i, batches), where=f"expert {name!r}")
    return sums


def regmean_deltas(problem: MergeProblem, alpha: float, sums: RegMeanSums | None = None) -> Deltas:
    """RegMean of `problem`'s experts at scaling 1: the closed form per Linear target, the plain mean elsewhere."""
    check_alpha(alpha)
    sums = sums if sums is not None else regmean_sums(problem)
    experts = problem.experts
    deltas = sums.deltas(alpha)
    mean = torch.full((experts.num_experts,), 1.0 / experts.num_experts)
    for name, target in experts.targets.items():
        if name not in deltas:
            deltas[name] = target_delta(target, mean).float()
    return {name: deltas[name] for name in experts.target_names}


def _check_scalings(method: str, scalings: Sequence[float]) -> None:
    if not scalings or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scalings):
        raise MergeInputError(f"{method}: scalings must be a non-empty list of finite numbers, got {scalings!r}")


def fisher(problem: MergeProblem, scalings: Sequence[float] = DATA_AWARE_SCALINGS,
           floor: float = FISHER_FLOOR) -> StaticMerge:
    """Fisher merging tuned on `problem`: the Fisher-weighted mean of the task vectors (computed once), times a
    scaling chosen from `scalings`."""
    _check_scalings("fisher", scalings)
    FisherSums(floor)  # checks the floor before any pass over the data
    batches = objective_batches(problem, one_example=True)
    unscaled = fisher_deltas(problem, floor, batches)
    examples = len(batches)
    return tune(problem, "fisher", {"scaling": scalings}, {"floor": floor, "examples": examples},
                lambda scaling: {name: delta * scaling for name, delta in unscaled.items()},
                "Fisher merging (arXiv 2111.09832): sum_i F_i tau_i / sum_i F_i with each expert's diagonal "
                "empirical Fisher on the search part (normalised, floored), times the scaling", hold=True)


def regmean(problem: MergeProblem, alphas: Sequence[float] = REGMEAN_ALPHAS,
            scalings: Sequence[float] = DATA_AWARE_SCALINGS) -> StaticMerge:
    """RegMean tuned on `problem`: the Gram matrices gathered once, ``alpha`` and the scaling chosen from
    `alphas` x `scalings`."""
    _check_scalings("regmean", scalings)
    for alpha in alphas:
        check_alpha(alpha)
    sums = regmean_sums(problem)
    cache: dict[float, Deltas] = {}

    def deltas_at(alpha: float, scaling: float) -> Deltas:
        if alpha not in cache:
            cache.clear()
            cache[alpha] = regmean_deltas(problem, alpha, sums)
        return {name: delta * scaling for name, delta in cache[alpha].items()}

    return tune(problem, "regmean", {"alpha": alphas, "scaling": scalings}, {"linear_targets": len(sums.gram)},
                deltas_at, "RegMean (arXiv 2212.09849): per Linear target (sum_i G_i)^-1 sum_i G_i W_i with the "
                           "experts' input Gram matrices on the search part (off-diagonals times alpha), the mean "
                           "elsewhere, times the scaling", hold=True)
