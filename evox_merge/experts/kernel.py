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
    eye = torch.eye(num_experts, dtype=layer.A_cat.dtype, device=layer.A_cat.device)
    return torch.stack([merged_delta(layer, eye[i]) for i in range(num_experts)])


def operator_delta(layer: LayerFactors, num_experts: int, method: str, weights: torch.Tensor,
                   density: float) -> torch.Tensor:
    """One layer's merged delta ``(out, in)`` by a `peft.utils.merge_utils` operator over the experts' dense task
    vectors: TIES (``ties``: keep the `density` largest entries, elect signs, weight by `weights (N,)`), DARE
    (``dare_linear``: drop entries at random, keeping `density`, rescale) or DARE-TIES (``dare_ties``). DARE draws
    its masks from torch's global RNG (seed it for reproducible masks)."""
    if method not in OPERATORS:
        raise ValueError(f"method must be one of {OPERATORS}, got {method!r}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    task_vectors = list(dense_task_vectors(layer, num_experts))
    return getattr(merge_utils, method)(task_vectors, weights.to(task_vectors[0]), density)
