"""Search spaces: how the flat vector an algorithm proposes becomes merge coefficients, layer by layer.

The expert and layer spaces map a vector ``x (D,)`` to a coefficient matrix ``(L, N)``, one row per target layer
of the `ExpertSet` (in ``experts.target_names`` order: LoRA-factored layers, then dense experts' parameters), so the in-place merge stays one fused ``addmm`` per target layer
per candidate (`evox_merge.experts.merger.InPlaceMerger.apply` takes the matrix); the operator space maps it to a
dense delta per layer.

* `ExpertSpace`: ``D = N``, one coefficient per expert for the whole model (every row of the matrix is ``x``).
* `LayerSpace`: ``D = N * K``, one coefficient per expert per group of target layers: ``K`` contiguous blocks of
  transformer layers (``by="blocks"``), or the module type (``by="module"``: attention vs MLP, and any other
  targeted module type as its own group). Dimension ``g * N + i`` is expert ``i`` in group ``g``; equal
  coefficients in every group give exactly the expert space's merge.
* `OperatorSpace`: ``D = N + 1``, a static operator's hyperparameters (TIES / DARE density and per-expert
  weights), so a search can improve on the static merge it starts from; a candidate is a dense delta per layer.

Each space names its dimensions (``names``) for records, recipe.json and plots, and says how to write any
expert-space vector in its own coordinates (`from_expert`), so searches can start from the same points (one-hot
experts, task-arithmetic scales) in every space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from evox.triton_kernels.kernels.lora_noise import compute_counter_offsets, generate_lora_factors

from evox_merge.experts.kernel import OPERATORS, LayerFactors, operator_delta, sorted_magnitudes, target_task_vectors
from evox_merge.util.errors import MergeInputError
from evox_merge.util.layer_names import block_index, module_kind

@dataclass(frozen=True)
class ExpertSpace:
    """One coefficient per expert for the whole model (today's default)."""

    layer_names: tuple[str, ...]
    expert_names: tuple[str, ...]
    kind: Literal["expert"] = "expert"

    @property
    def dim(self) -> int:
        return len(self.expert_names)

    @property
    def names(self) -> list[str]:
        return list(self.expert_names)

    def layer_coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """``x (D,)`` or ``(P, D)`` -> ``(L, N)`` or ``(P, L, N)``."""
        return x.unsqueeze(-2).expand(*x.shape[:-1], len(self.layer_names), x.shape[-1])

    def from_expert(self, coefficients: torch.Tensor) -> torch.Tensor:
        return coefficients.clone()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "names": self.names}


@dataclass(frozen=True)
class LayerSpace:
    """One coefficient per expert per group of target layers (see the module docstring)."""

    layer_names: tuple[str, ...]
    expert_names: tuple[str, ...]
    group_names: tuple[str, ...]
    group_of_layer: tuple[int, ...]
    by: Literal["blocks", "module"] = "blocks"
    kind: Literal["layer"] = "layer"

    @classmethod
    def build(cls, layer_names: list[str], expert_names: list[str], by: str = "blocks",
              groups: int | None = None) -> "LayerSpace":
        """Group the target layers: ``by="blocks"`` into `groups` contiguous blocks of transformer layers (layers
        whose name has no block index form a group of their own), ``by="module"`` by module type."""
        if by == "module":
            kinds = [module_kind(name) for name in layer_names]
            group_names = sorted(set(kinds), key=kinds.index)
            return cls(tuple(layer_names), tuple(expert_names), tuple(group_names),
                       tuple(group_names.index(kind) for kind in kinds), by="module")
        if by != "blocks":
            raise MergeInputError(f"space.by must be 'blocks' or 'module', got {by!r}")
        blocks = [block_index(name) for name in layer_names]
        indexed = sorted({b for b in blocks if b is not None})
        if not indexed:
            raise MergeInputError("space: no target layer name has a block index (e.g. model.layers.3.); use "
                                  "by: module")
        if groups is None or not 1 <= groups <= len(indexed):
            raise MergeInputError(f"space.groups must be an integer from 1 to {len(indexed)} (the transformer "
                                  f"blocks the experts target), got {groups!r}")
        position = {block: i for i, block in enumerate(indexed)}
        group_of_block = {block: position[block] * groups // len(indexed) for block in indexed}
        names = []
        for g in range(groups):
            members = [b for b in indexed if group_of_block[b] == g]
            names.append(f"blocks {members[0]}-{members[-1]}" if len(members) > 1 else f"block {members[0]}")
        group_of_layer = [group_of_block[b] if b is not None else groups for b in blocks]
        if groups in group_of_layer:
            names.append("other")
        return cls(tuple(layer_names), tuple(expert_names), tuple(names), tuple(group_of_layer), by="blocks")

    @property
    def dim(self) -> int:
        return len(self.group_names) * len(self.expert_names)

    @property
    def names(self) -> list[str]:
        return [f"{group}/{expert}" for group in self.group_names for expert in self.expert_names]

    def layer_coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """``x (D,)`` or ``(P, D)`` -> ``(L, N)`` or ``(P, L, N)``: each layer takes its group's N coefficients."""
        grouped = x.reshape(*x.shape[:-1], len(self.group_names), len(self.expert_names))
        return grouped[..., list(self.group_of_layer), :]

    def from_expert(self, coefficients: torch.Tensor) -> torch.Tensor:
        """The same merge as expert-space `coefficients (N,)` or ``(P, N)``: every group gets them."""
        return coefficients.tile(len(self.group_names))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "by": self.by, "dim": self.dim, "groups": list(self.group_names),
                "names": self.names,
                "layers": {name: self.group_names[g] for name, g in zip(self.layer_names, self.group_of_layer)}}


SORTED_CACHE_BYTES = 4 << 30
"""At most this much memory per operator space for TIES's sorted magnitude tables (4 GiB: every layer of a
135M-parameter model with six all-linear LoRA experts, 2.5 GB)."""


@dataclass(frozen=True)
class OperatorSpace:
    """The hyperparameters of a static operator instead of raw coefficients: ``x = (d, s_1 .. s_N)``, the operator
    (TIES, DARE or DARE-TIES, `evox_merge.experts.kernel.operator_delta`) keeping density
    ``clamp((d + 1) / 2, 0.01, 1)`` of each task vector, expert i weighted ``s_i``. A candidate is a dense delta per
    target layer (merged with `InPlaceMerger.apply_deltas`, not the fused low-rank update): per candidate it costs
    every expert's dense task vector of every layer and the operator over them. DARE's random masks come from
    `seed`, the same for every candidate, so a candidate's merge is a function of ``x``. TIES sorts each layer's
    task-vector magnitudes once (kept up to `SORTED_CACHE_BYTES` per space; layers past it find their thresholds
    per candidate), so a candidate's pruning is a lookup, and merges LoRA layers block by block of rows
    (`evox_merge.experts.kernel.ties_layer_delta`) without an ``(N, out, in)`` temporary."""

    layer_names: tuple[str, ...]
    expert_names: tuple[str, ...]
    method: str = "ties"
    seed: int = 0
    kind: Literal["operator"] = "operator"
    _sorted: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.method not in OPERATORS:
            raise MergeInputError(f"space.method must be one of {list(OPERATORS)}, got {self.method!r}")

    @property
    def dim(self) -> int:
        return 1 + len(self.expert_names)

    @property
    def names(self) -> list[str]:
        return ["density", *(f"scale/{expert}" for expert in self.expert_names)]

    @staticmethod
    def density(x: torch.Tensor) -> float:
        return min(1.0, max(0.01, (float(x[0]) + 1) / 2))

    def deltas(self, x: torch.Tensor, layers: dict[str, LayerFactors]) -> dict[str, torch.Tensor]:
        """The merged delta per target layer of candidate ``x (D,)``."""
        weights, density = x[1:].float(), self.density(x)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return {name: operator_delta(layers[name], len(self.expert_names), self.method, weights, density,
                                         self._magnitudes(name, layers[name]))
                    for name in self.layer_names}

    def _magnitudes(self, name: str, layer) -> torch.Tensor | None:
        """Layer `name`'s sorted task-vector magnitudes for TIES (sorted on first use while the cache has room)."""
        if self.method != "ties":
            return None
        if name not in self._sorted:
            used = sum(table.numel() * table.element_size() for table in self._sorted.values() if table is not None)
            if isinstance(layer, LayerFactors):  # the table's size, known before building anything
                shape, dtype = (layer.B_scaled.shape[0], layer.A_cat.shape[1]), layer.B_scaled.dtype
            else:
                shape, dtype = layer.shape, layer.dtype
            size = len(self.expert_names) * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            self._sorted[name] = (sorted_magnitudes(target_task_vectors(layer, len(self.expert_names)))
                                  if used + size <= SORTED_CACHE_BYTES else None)
        return self._sorted[name]

    def from_expert(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Density 1 with the coefficients as weights (for ``dare_linear`` exactly the linear merge; TIES still
        elects signs)."""
        ones = torch.ones(*coefficients.shape[:-1], 1, dtype=coefficients.dtype)
        return torch.cat([ones, coefficients], dim=-1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "method": self.method, "seed": self.seed, "dim": self.dim, "names": self.names,
                "density": "clamp((x[0] + 1) / 2, 0.01, 1)"}


class PerturbationSpace:
    """MERGEvolve's space (`evox_merge.algorithms.mergevolve`): a candidate ``x = (seed, sign)`` is the centre's
    dense delta per target layer plus ``sign * sigma_l * B A / sqrt(rank)``, a rank-`rank` Gaussian perturbation
    regenerated from `seed` by EvoX's counter-based Philox streams (`evox.triton_kernels.kernels.lora_noise`), so
    a candidate is its two numbers on every process and after a resume. ``sigma_l = sigma * rms(centre_l)`` (the
    perturbation is relative to each layer's delta; layers whose centre is zero use the mean rms of the others).
    The centre (the merge being evolved) starts as a merge of the experts and is moved by the algorithm."""

    kind = "perturbation"

    def __init__(self, layer_names: Sequence[str], expert_names: Sequence[str], centre: dict[str, torch.Tensor],
                 rank: int, sigma: float) -> None:
        if rank < 1 or sigma <= 0:
            raise MergeInputError(f"perturbation rank must be >= 1 and sigma > 0, got rank {rank}, sigma {sigma}")
        self.layer_names, self.expert_names = tuple(layer_names), tuple(expert_names)
        self.rank, self.sigma = rank, float(sigma)
        self.shapes = [tuple(centre[name].shape) for name in self.layer_names]
        self.offsets = compute_counter_offsets(self.shapes, rank)
        self.set_centre(centre)

    def set_centre(self, centre: dict[str, torch.Tensor]) -> None:
        self.centre = {name: centre[name].detach().float().clone() for name in self.layer_names}
        rms = {name: float(delta.pow(2).mean().sqrt()) for name, delta in self.centre.items()}
        fallback = sum(rms.values()) / max(sum(v > 0 for v in rms.values()), 1)
        self.scales = {name: (value if value > 0 else fallback) for name, value in rms.items()}

    @property
    def dim(self) -> int:
        return 2

    @property
    def names(self) -> list[str]:
        return ["seed", "sign"]

    def factors(self, seeds: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the perturbation factors of `seeds (P,)` int64: ``A (P, rank, in)``, ``B (P, out, rank)``
        (the unit perturbation is ``B A / sqrt(rank)``)."""
        return {name: generate_lora_factors(seeds, shape, self.rank, offset)
                for name, shape, offset in zip(self.layer_names, self.shapes, self.offsets)}

    def noise(self, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per layer, the unit perturbations ``B A / sqrt(rank)`` of `seeds (P,)` int64: ``(P, out, in)``."""
        return {name: torch.bmm(b, a) / self.rank ** 0.5 for name, (a, b) in self.factors(seeds).items()}

    def deltas(self, x: torch.Tensor, layers: dict | None = None) -> dict[str, torch.Tensor]:
        """The dense delta per target layer of candidate ``x = (seed, sign)``."""
        seed, sign = int(x[0]), float(x[1])
        noise = self.noise(torch.tensor([seed], dtype=torch.int64))
        return {name: self.centre[name] + sign * self.sigma * self.scales[name] * noise[name][0].to(self.centre[name])
                for name in self.layer_names}

    def from_expert(self, coefficients: torch.Tensor) -> torch.Tensor:
        raise MergeInputError("a perturbation space scores perturbations of its centre; expert-space merges (static "
                              "merges, normalisation anchors) are scored on an expert-space problem")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "sigma": self.sigma, "names": self.names}


SearchSpace = ExpertSpace | LayerSpace | OperatorSpace | PerturbationSpace


def build_space(layer_names: list[str], expert_names: list[str], kind: str = "expert", **options: Any) -> SearchSpace:
    """A space by kind: ``expert``, ``layer`` (`LayerSpace.build`'s options) or ``operator`` (``method``,
    ``seed``)."""
    if kind == "expert":
        if options:
            raise MergeInputError(f"space: kind 'expert' takes no options, got {sorted(options)}")
        return ExpertSpace(tuple(layer_names), tuple(expert_names))
    if kind == "layer":
        return LayerSpace.build(layer_names, expert_names, **options)
    if kind == "operator":
        return OperatorSpace(tuple(layer_names), tuple(expert_names), **options)
    raise MergeInputError(f"space.kind must be 'expert', 'layer' or 'operator', got {kind!r}")
