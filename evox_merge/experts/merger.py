"""In-place merging: write the kernel's merged delta into the base model's target layers, once per candidate."""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch

from evox_merge.experts.expert_set import ExpertSet
from evox_merge.experts.kernel import merged_factors

_SHARED: "weakref.WeakKeyDictionary[ExpertSet, InPlaceMerger]" = weakref.WeakKeyDictionary()


def shared_merger(experts: ExpertSet) -> "InPlaceMerger":
    """The one in-place merger of `experts`' model, shared by every problem built on it (one ``W0`` copy)."""
    if experts not in _SHARED:
        _SHARED[experts] = InPlaceMerger(experts)
    return _SHARED[experts]


class InPlaceMerger:
    """Writes merged weights straight into the base model's target layers and restores them.

    Keeps one copy of each target layer's original weight ``W0`` (only the targeted layers), so that every
    candidate starts from exactly ``W0``: candidates never leak into one another, whatever order they come in.
    """

    def __init__(self, experts: ExpertSet) -> None:
        self._experts = experts
        self._weights = {name: experts.target_module(name).weight for name in experts.layers}
        self._originals = {name: weight.detach().clone() for name, weight in self._weights.items()}

    @torch.no_grad()
    def apply(self, coefficients: torch.Tensor) -> None:
        """Set every target layer to ``W0 + merged_delta(coefficients)`` with one fused ``addmm``; ``coefficients
        (N,)`` for the whole model, or ``(L, N)``, one row per target layer in ``experts.layers`` order (a search
        space's `layer_coefficients`, `evox_merge.experts.spaces`)."""
        per_layer = coefficients.ndim == 2
        if per_layer and coefficients.shape[0] != len(self._experts.layers):
            raise ValueError(f"per-layer coefficients need {len(self._experts.layers)} rows (one per target layer), "
                             f"got {tuple(coefficients.shape)}")
        for index, (name, factors) in enumerate(self._experts.layers.items()):
            a, b = merged_factors(factors, coefficients[index] if per_layer else coefficients)
            torch.addmm(self._originals[name], b, a, out=self._weights[name])

    @torch.no_grad()
    def apply_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """Set each named target layer to ``W0 + delta`` (``delta (out, in)``); other target layers to ``W0``."""
        unknown = sorted(set(deltas) - set(self._weights))
        if unknown:
            raise KeyError(f"not target layers of these experts: {unknown}")
        for name, weight in self._weights.items():
            weight.copy_(self._originals[name])
            if name in deltas:
                weight.add_(deltas[name].to(weight.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        """Put every target layer back to its original weight ``W0``."""
        for name, weight in self._weights.items():
            weight.copy_(self._originals[name])

    @contextmanager
    def merged(self, coefficients: torch.Tensor) -> Iterator[None]:
        """Context in which the model holds the merge for ``coefficients (N,)``; restored on exit, even on error."""
        self.apply(coefficients)
        try:
            yield
        finally:
            self.restore()
