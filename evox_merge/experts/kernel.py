"""The merge kernel: the one formula every merge of LoRA experts goes through.

A candidate ``c (N,)`` merges N LoRA experts into the base model as ``W = W0 + sum_i c_i s_i B_i A_i`` in every
target layer. With the experts' factors stacked per layer (`LayerFactors`), that delta is
``(B_scaled * c[expert_of_rank]) @ A_cat``: the coefficients scale the columns of the stacked ``B``. The in-place
merger (`evox_merge.experts.merger`) writes it into the model; the release (`evox_merge.run.release`) writes the
factors themselves as a PEFT adapter. Pure functions, no state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.utils import merge_utils

OPERATORS = ("ties", "dare_linear", "dare_ties")


@dataclass
class LayerFactors:
    """The experts' stacked LoRA factors of one target Linear layer.

    Attributes:
        A_cat: ``(sum_r, in)`` every expert's A stacked along the rank axis (experts that do not target the
            layer contribute no rows).
        B_scaled: ``(out, sum_r)`` every expert's ``scaling * B`` stacked the same way.
        expert_of_rank: ``(sum_r,)`` long, which expert each rank row belongs to, so a coefficient vector
            ``d (N,)`` expands to the diagonal ``d[expert_of_rank]``.
    """

    A_cat: torch.Tensor
    B_scaled: torch.Tensor
    expert_of_rank: torch.Tensor


def merged_factors(layer: LayerFactors, coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (R, in), B (out, R))`` whose product is the merged delta of ``coefficients (N,)``; R = the layer's sum_r.

    ``A`` is the stacked ``A_cat`` itself (not a copy); ``B`` is ``B_scaled`` with each rank column scaled by its
    expert's coefficient.
    """
    return layer.A_cat, layer.B_scaled * coefficients.to(layer.B_scaled)[layer.expert_of_rank]


def merged_delta(layer: LayerFactors, coefficients: torch.Tensor) -> torch.Tensor:
    """The merged weight delta ``sum_i c_i s_i B_i A_i`` of shape ``(out, in)`` for ``coefficients (N,)``."""
    a, b = merged_factors(layer, coefficients)
    return b @ a


def dense_task_vectors(layer: LayerFactors, num_experts: int) -> torch.Tensor:
    """Every expert's dense delta ``s_i B_i A_i`` of this layer, ``(N, out, in)`` (zeros where not targeted)."""
    return task_vector_rows(layer, num_experts, 0, layer.B_scaled.shape[0])


def target_delta(target, coefficients: torch.Tensor) -> torch.Tensor:
    """The merged delta of one merge target for ``coefficients (N,)``: a LoRA-factored layer (`LayerFactors`,
    `merged_delta`) or a dense parameter (`evox_merge.experts.dense.DenseTarget`, ``sum_i c_i tau_i``)."""
    if isinstance(target, LayerFactors):
        return merged_delta(target, coefficients)
    return target.merged_delta(coefficients)


def target_task_vectors(target, num_experts: int) -> torch.Tensor:
    """Every expert's task vector of one merge target, ``(N, *shape)`` (zeros for experts that do not change it)."""
    if isinstance(target, LayerFactors):
        return dense_task_vectors(target, num_experts)
    return target.task_vectors(num_experts)


def sorted_magnitudes(task_vectors: torch.Tensor) -> torch.Tensor:
    """Each expert's task-vector magnitudes in ascending order, ``(N, numel)``: the table `magnitude_prune` reads a
    density's threshold from (an operator-space search sorts once and prunes every candidate by lookup)."""
    return task_vectors.reshape(task_vectors.shape[0], -1).abs().sort(dim=1).values


def pruning_thresholds(task_vectors: torch.Tensor, density: float,
                       magnitudes: torch.Tensor | None = None) -> torch.Tensor:
    """Per expert of `task_vectors (N, ...)`, the magnitude an entry needs to be among the ``int(density * numel)``
    largest, ``(N,)``: read from `magnitudes` (`sorted_magnitudes`' table) or found by ``kthvalue``; ``inf`` when
    that count is 0 (nothing kept)."""
    flat = task_vectors.reshape(task_vectors.shape[0], -1)
    return _thresholds(flat, flat.shape[1], density, magnitudes)


def _thresholds(flat: torch.Tensor | None, numel: int, density: float, magnitudes: torch.Tensor | None) -> torch.Tensor:
    k = int(density * numel)
    if k == 0:
        table = magnitudes if magnitudes is not None else flat
        return torch.full((table.shape[0],), float("inf"), dtype=table.dtype, device=table.device)
    if magnitudes is not None:
        return magnitudes[:, numel - k]
    return flat.abs().kthvalue(numel - k + 1, dim=1).values


def magnitude_prune(task_vectors: torch.Tensor, density: float, magnitudes: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest-magnitude entries of each of `task_vectors (N, ...)`, zero the rest:
    `peft.utils.merge_utils.magnitude_based_pruning` per expert, batched, with the k-th largest magnitude as a
    threshold (`pruning_thresholds`) instead of ``topk``'s indices (faster per candidate on CPU;
    benchmarks/results/beyond_hull.md). Entries tied exactly at the threshold are all kept, where ``topk`` keeps
    an arbitrary subset of them."""
    threshold = pruning_thresholds(task_vectors, density, magnitudes)
    shape = (-1,) + (1,) * (task_vectors.dim() - 1)
    return torch.where(task_vectors.abs() >= threshold.reshape(shape), task_vectors, 0)


def _ties_merge(pruned: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """peft's TIES after pruning: its sign election and disjoint merge of `pruned (N, ...)` weighted `weights`."""
    sign_mask = merge_utils.calculate_majority_sign_mask(pruned)
    weighted = pruned * merge_utils.reshape_weight_task_tensors(pruned, weights)
    return merge_utils.disjoint_merge(weighted, sign_mask)


TIES_BLOCK_ENTRIES = 1 << 16
"""Entries per expert in one block of `ties_layer_delta` (a block's temporaries stay in the CPU's cache)."""


def task_vector_rows(layer: LayerFactors, num_experts: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of every expert's dense delta of a LoRA layer, ``(N, stop - start, in)``: each row is one
    expert's scaled ``B`` row (`merged_factors` with that expert's one-hot coefficients) times ``A_cat``."""
    eye = torch.eye(num_experts, dtype=layer.A_cat.dtype, device=layer.A_cat.device)
    rows = layer.B_scaled[start:stop]
    return torch.stack([(rows * eye[i][layer.expert_of_rank]) @ layer.A_cat for i in range(num_experts)])


def ties_layer_delta(layer: LayerFactors, num_experts: int, weights: torch.Tensor, density: float,
                     magnitudes: torch.Tensor) -> torch.Tensor:
    """TIES over a LoRA layer's task vectors block by block of output rows, given the layer's sorted magnitude
    table (`sorted_magnitudes`): each block's task-vector rows are built from the factors (`task_vector_rows`),
    pruned at the per-expert thresholds the table gives, and sign-elected and merged by peft (`_ties_merge`), so no
    ``(N, out, in)`` temporary exists and the passes over the entries run on blocks that stay in the CPU's cache.
    Equals ``_ties_merge(magnitude_prune(...))`` over the whole layer entry for entry (every entry goes through the
    same operations)."""
    out_features, in_features = layer.B_scaled.shape[0], layer.A_cat.shape[1]
    threshold = _thresholds(None, out_features * in_features, density, magnitudes).reshape(-1, 1, 1)
    delta = torch.empty(out_features, in_features, dtype=layer.B_scaled.dtype, device=layer.B_scaled.device)
    step = max(1, TIES_BLOCK_ENTRIES // in_features)
    for start in range(0, out_features, step):
        rows = task_vector_rows(layer, num_experts, start, min(start + step, out_features))
        delta[start:start + step] = _ties_merge(torch.where(rows.abs() >= threshold, rows, 0), weights)
    return delta


def operator_delta(layer, num_experts: int, method: str, weights: torch.Tensor,
                   density: float, magnitudes: torch.Tensor | None = None) -> torch.Tensor:
    """One target's (a `LayerFactors` or a dense parameter's) merged delta by a `peft.utils.merge_utils` operator
    over the experts' dense task vectors: TIES (``ties``: keep the `density` largest entries, elect signs, weight by
    `weights (N,)`; the pruning is `magnitude_prune`, with `magnitudes` its optional sorted table, the sign election
    and disjoint merge peft's; a LoRA layer with a table block by block, `ties_layer_delta`), DARE
    (``dare_linear``: drop entries at random, keeping `density`, rescale) or DARE-TIES (``dare_ties``). DARE draws
    its masks from torch's global RNG (seed it for reproducible masks)."""
    if method not in OPERATORS:
        raise ValueError(f"method must be one of {OPERATORS}, got {method!r}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if method == "ties" and isinstance(layer, LayerFactors) and magnitudes is not None:
        return ties_layer_delta(layer, num_experts, weights.to(layer.B_scaled), density, magnitudes)
    task_vectors = target_task_vectors(layer, num_experts)
    weights = weights.to(task_vectors)
    if method == "ties":
        return _ties_merge(magnitude_prune(task_vectors, density, magnitudes), weights)
    return getattr(merge_utils, method)(list(task_vectors), weights, density)


def span_residual(layer: LayerFactors, num_experts: int, delta: torch.Tensor) -> tuple[float, float]:
    """How far a layer's merged `delta (out, in)` lies outside the span of the experts' task vectors: the norm of
    its part that no linear combination ``sum_i c_i s_i B_i A_i`` reaches (least squares over the flattened task
    vectors, float64) and that norm relative to the delta's own (0 for any linear merge of these experts, up to
    rounding; 1 for a delta orthogonal to all of them). Returns ``(residual norm, relative residual)``."""
    basis = target_task_vectors(layer, num_experts).reshape(num_experts, -1).double().T  # (out * in, N)
    target = delta.reshape(-1, 1).double().to(basis.device)
    solution = torch.linalg.lstsq(basis, target, driver="gelsd").solution
    residual = float((target - basis @ solution).norm())
    total = float(target.norm())
    return residual, (residual / total if total > 0 else 0.0)


def span_report(layers: dict[str, LayerFactors], num_experts: int, deltas: dict[str, torch.Tensor]) -> dict:
    """`span_residual` of a dense merge per target layer and overall (the residuals' and the deltas' norms
    pooled over layers): ``{"relative": float, "per_layer": {name: relative}}``."""
    per_layer, residual_sq, total_sq = {}, 0.0, 0.0
    for name, delta in deltas.items():
        residual, relative = span_residual(layers[name], num_experts, delta)
        per_layer[name] = relative
        residual_sq += residual ** 2
        total_sq += float(delta.double().norm()) ** 2
    return {"relative": (residual_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0, "per_layer": per_layer}
