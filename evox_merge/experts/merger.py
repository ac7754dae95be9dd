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
    """Writes merged weights straight into the base model's target parameters and restores them.

    Keeps one copy of each target layer's original weight ``W0`` (only the targeted layers, and the dense targets'
    parameters in ``memory``/``svd`` mode; in ``stream`` mode a dense parameter is restored from the base's file),
    so that every candidate starts from exactly ``W0``: candidates never leak into one another, whatever order
    they come in. ``W0`` is kept in the model's dtype (bfloat16 too: the copy is exact), and each merged weight is
    ``W0 + B A`` rounded once to it by the ``addmm`` (tests/test_dtype.py measures bfloat16 against float32).
    """

    def __init__(self, experts: ExpertSet) -> None:
        self._experts = experts
        self._weights = {name: experts.target_weight(name) for name in experts.target_names}
        # A dense parameter that is also a LoRA-targeted layer's weight gets its dense part on top of the layer's.
        self._on_top = {name for name in experts.dense if name.endswith(".weight")
                        and name[: -len(".weight")] in experts.layers}
        self._originals = {name: weight.detach().clone() for name, weight in self._weights.items()
                           if name not in self._on_top and not (name in experts.dense and experts.dense[name].streamed)}
        for name in self._on_top:
            self._originals[name] = self._originals[name[: -len(".weight")]]

    def original(self, name: str) -> torch.Tensor:
        """Target `name`'s original value ``W0`` (read from the base's file for a streamed dense parameter)."""
        if name in self._originals:
            return self._originals[name]
        return self._experts.dense[name].base()

    @torch.no_grad()
    def apply(self, coefficients: torch.Tensor) -> None:
        """Set every target to ``W0 + merged delta(coefficients)``: one fused ``addmm`` per LoRA-factored layer,
        the dense experts' task vectors added per parameter. ``coefficients (N,)`` for the whole model, or
        ``(L, N)``, one row per target in ``experts.target_names`` order (a search space's `layer_coefficients`,
        `evox_merge.experts.spaces`)."""
        per_layer = coefficients.ndim == 2
        names = self._experts.target_names
        if per_layer and coefficients.shape[0] != len(names):
            raise ValueError(f"per-layer coefficients need {len(names)} rows (one per target layer), "
                             f"got {tuple(coefficients.shape)}")
        if self._experts.layers:  # one copy to the device per candidate, not one (synchronising) per layer
            coefficients = coefficients.to(next(iter(self._experts.layers.values())).B_scaled.device)
        for index, (name, factors) in enumerate(self._experts.layers.items()):
            a, b = merged_factors(factors, coefficients[index] if per_layer else coefficients)
            torch.addmm(self._originals[name], b, a, out=self._weights[name])
        offset = len(self._experts.layers)
        # One device-to-host copy per candidate, not one per dense parameter.
        values = coefficients.detach().double().cpu().tolist() if self._experts.dense else []
        for index, (name, target) in enumerate(self._experts.dense.items()):
            weight, base = self._weights[name], self.original(name)
            if name not in self._on_top:
                weight.copy_(base)
            target.add_merge(weight, base, values[offset + index] if per_layer else values)

    @torch.no_grad()
    def apply_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """Set each named target to ``W0 + delta``; other targets to ``W0``. A dense parameter that is also a LoRA
        layer's weight takes both its deltas (the layer's and its own)."""
        unknown = sorted(set(deltas) - set(self._weights))
        if unknown:
            raise KeyError(f"not target layers of these experts: {unknown}")
        self.restore()
        for name, delta in deltas.items():
            self._weights[name].add_(delta.to(self._weights[name]))  # the weight's dtype and device

    @torch.no_grad()
    def restore(self) -> None:
        """Put every target back to its original value ``W0``."""
        for name, weight in self._weights.items():
            if name not in self._on_top:
                weight.copy_(self.original(name))

    @contextmanager
    def merged(self, coefficients: torch.Tensor) -> Iterator[None]:
        """Context in which the model holds the merge for ``coefficients (N,)``; restored on exit, even on error."""
        self.apply(coefficients)
        try:
            yield
        finally:
            self.restore()
