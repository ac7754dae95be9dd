"""Write a merge as files others can load: a PEFT LoRA adapter and, on request, a full merged model (the only
form for dense experts' merges).

The merged delta of LoRA experts is low-rank: in each target layer it is ``B_cat diag(c * s) A_cat``, so the
exact merge is itself a LoRA adapter of rank ``sum_r`` (the experts' factors concatenated, the coefficients
folded into B). `write_lora_adapter` writes that, or compresses each layer with a truncated SVD to a stated rank
and reports the relative error it made. A dense merge (TIES, DARE) is not low-rank: `write_merge` writes its
per-layer deltas as full-rank LoRA factors (exact) unless a rank is stated. A merge of dense (fully fine-tuned)
experts changes parameters a LoRA adapter cannot hold (norms, embeddings, biases): `write_merge` writes it as a
full model (``model/``, safetensors, loadable with ``from_pretrained``) and no adapter.

`write_merge` writes each folder beside its target and swaps it in whole, with a record of its files
(`evox_merge.util.ownership`): a crash mid-write leaves the earlier folder as it was, and an existing folder is
replaced only when it holds such a record by the same writer and nothing that record does not list.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from evox_merge.util.atomic import atomic_path
from evox_merge.util.ownership import staged_folder
from evox_merge.experts import ExpertSet
from evox_merge.experts.kernel import merged_factors
from evox_merge.experts.merger import shared_merger
from evox_merge.problems.static_merges import StaticMerge


def _truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of ``b @ a`` (through QR of each factor, so no dense SVD) and the relative error."""
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, len(s))
    root = s[:k].sqrt()
    new_b = (q_b @ u[:, :k]) * root
    new_a = root.unsqueeze(1) * (vh[:k] @ q_a.T)
    total = s.square().sum()
    error = float((s[k:].square().sum() / total).sqrt()) if total > 0 else 0.0
    return new_a.float(), new_b.float(), error


def write_lora_adapter(
    experts: ExpertSet, coefficients: torch.Tensor, out_dir: str | Path, rank: int | None = None
) -> dict:
    """Write the merge for ``coefficients (N,)`` (or ``(L, N)``, per target layer in ``experts.layers`` order) as a
    PEFT LoRA adapter that `PeftModel.from_pretrained` loads.

    Args:
        rank: None writes the exact merge (per layer rank sum_r); an int compresses every layer to at most
            that rank with a truncated SVD.

    Returns:
        ``{"exact": bool, "ranks": {layer: r}, "max_relative_error": float, "relative_errors": {layer: e}}``
        (errors are Frobenius-norm ratios of the dropped part of each layer's delta; 0 when exact).
    """
    per_layer = coefficients.ndim == 2
    factors = {name: tuple(f.float().cpu() for f in merged_factors(layer, coefficients[i] if per_layer else coefficients))
               for i, (name, layer) in enumerate(experts.layers.items())}
    return _write_factors(experts, factors, out_dir, rank)


def write_merge(experts: ExpertSet, merge: StaticMerge, out_dir: str | Path, rank: int | None = None,
                full_model: bool = False, written_by: str = "evox-merge search") -> dict:
    """Write a selected merge (coefficients, or dense deltas for TIES/DARE) as ``adapter/`` (and ``model/``); a
    merge of dense experts as ``model/`` only (returns ``{"exact": True, "format": "full model", ...}``).

    Each folder is written whole or not at all and records its files as written by `written_by`
    (`evox_merge.util.ownership.staged_folder`).

    Raises:
        MergeInputError: ``adapter/`` or ``model/`` exists and holds files `written_by` did not write (checked
            before any work).
    """
    out_dir = Path(out_dir)
    if experts.dense:
        with staged_folder(out_dir / "model", written_by) as folder:
            _write_full_model(experts, merge, folder)
        return {"exact": True, "format": "full model", "ranks": {}, "relative_errors": {}, "max_relative_error": 0.0}
    with staged_folder(out_dir / "adapter", written_by) as folder:
        if not merge.dense:
            info = write_lora_adapter(experts, merge.layer_coefficients(), folder, rank)
        else:
            factors = {}
            deltas = merge.merged_deltas(experts.layers)
            for name, delta in deltas.items():  # (out, in): B = delta, A = identity, then SVD in _write_factors
                delta = delta.float().cpu()
                factors[name] = (torch.eye(delta.shape[1]), delta)
            full = {name: min(delta.shape) for name, delta in deltas.items()}
            info = _write_factors(experts, factors, folder, rank if rank is not None else max(full.values()))
            info["exact"] = rank is None
    if full_model:
        with staged_folder(out_dir / "model", written_by) as folder:
            _write_full_model(experts, merge, folder)
    return info


def _write_factors(experts: ExpertSet, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], out_dir: str | Path,
                   rank: int | None) -> dict:
    """Write per-layer ``(A (r, in), B (out, r))`` as a PEFT adapter, SVD-truncated to `rank` when given."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, ranks, errors = {}, {}, {}
    for name, (a, b) in factors.items():
        if rank is not None:
            a, b, errors[name] = _truncate(a, b, rank)
        ranks[name] = a.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    patterns = {re.escape(name): r for name, r in ranks.items()}
    config = LoraConfig(
        r=max(ranks.values()),
        lora_alpha=max(ranks.values()),
        target_modules=sorted(ranks),
        rank_pattern=patterns,
        alpha_pattern=patterns,  # alpha = r in every layer: scaling 1, the coefficients live in B
        base_model_name_or_path=experts.base_path,
    )
    config.save_pretrained(str(out_dir))
    with atomic_path(out_dir / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return {
        "exact": rank is None,
        "ranks": ranks,
        "relative_errors": errors,
        "max_relative_error": max(errors.values(), default=0.0),
    }


def _write_full_model(experts: ExpertSet, merge: StaticMerge, out_dir: Path) -> None:
    merger = shared_merger(experts)
    try:
        if not merge.dense:
            merger.apply(merge.layer_coefficients())
        else:
            merger.apply_deltas(merge.merged_deltas(experts.targets))
        experts.model.save_pretrained(out_dir)
    finally:
        merger.restore()
    experts.tokenizer.save_pretrained(out_dir)
