"""Several candidates in one forward pass: the experts' LoRA factors run unmerged, with a coefficient per row.

Instead of writing candidate ``c_p``'s merge into the weights, every target Linear computes, for the rows of
candidate ``p``, ``x W0^T + ((x A_cat^T) * c_p[expert_of_rank]) B_scaled^T`` (the kernel's formula, see
`evox_merge.experts.kernel`, applied to activations instead of weights). A batch tiled over P candidates
(`evox_merge.tasks.batching.tile_batch`, copy-major) is then scored for all of them in one pass: on a GPU, P small
forward passes become one P times wider. The weights are never written: forward hooks, removed on exit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from evox_merge.experts.expert_set import ExpertSet
from evox_merge.experts.kernel import LayerFactors
from evox_merge.util.errors import MergeInputError


def _row_delta_hook(factors: LayerFactors, scales: torch.Tensor):
    """A forward hook adding candidate p's low-rank delta to the output rows of copy p; ``scales (P, sum_r)``."""
    copies, ranks = scales.shape

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        low = (args[0] @ factors.A_cat.T).reshape(copies, -1, ranks) * scales.unsqueeze(1)
        return output + (low @ factors.B_scaled.T).reshape(output.shape)

    return hook


@contextmanager
def candidate_rows(experts: ExpertSet, population: torch.Tensor) -> Iterator[int]:
    """Context in which the model scores ``population (P, N)`` (or ``(P, L, N)``, per target layer) at once: in
    every batch of ``P * b`` rows, rows ``p * b ... p * b + b - 1`` see candidate ``p``'s merged model. Yields P.
    The base weights stay ``W0`` throughout (they must be ``W0`` on entry: no in-place merge applied)."""
    if experts.dense:
        raise MergeInputError("several candidates per pass run LoRA experts' factors unmerged; dense experts' task "
                              "vectors merge in place only")
    handles = []
    try:
        for index, (name, factors) in enumerate(experts.layers.items()):
            layer = population[:, index] if population.ndim == 3 else population
            scales = layer.to(factors.B_scaled)[:, factors.expert_of_rank]
            handles.append(experts.target_module(name).register_forward_hook(_row_delta_hook(factors, scales)))
        yield population.shape[0]
    finally:
        for handle in handles:
            handle.remove()
