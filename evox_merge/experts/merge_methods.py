"""Merge formulas beyond TIES and DARE, on one merge target's task vectors (pure functions, torch only).

Every function takes the N experts' task vectors of one target stacked as ``tv (N, *shape)`` (a LoRA layer's exact
``s_i B_i A_i`` or a dense parameter's ``theta_i - theta_0``: `evox_merge.experts.kernel.target_task_vectors`) and
returns the merged delta ``(*shape)`` that is added to the base weight, or a step of it. Where mergekit 0.1.5 has the
method, the operations follow its order (so the same inputs give the same bits where the formula is the same:
benchmarks/mergekit_crosscheck.py); every departure is written in the docstring.

- DELLA (arXiv 2406.11617): `magprune` (keep probabilities ranked by magnitude within each row, ``density +-
  epsilon``, rescaled), then `combine` with sign election (``della``) or a plain sum (``della_linear``).
- Model Breadcrumbs (arXiv 2312.06795): `breadcrumbs_prune` (drop the largest ``gamma`` fraction and the smallest,
  keeping ``density``), then `combine` without (``breadcrumbs``) or with sign election (``breadcrumbs_ties``).
- Model Stock (arXiv 2403.19522): `model_stock_ratio`, `model_stock_delta`.
- SLERP between two experts' weights (`slerp`), NuSLERP of two task vectors (`nuslerp`), multi-SLERP of N task
  vectors (`multislerp`): mergekit's definitions.
- SCE (arXiv 2408.07990): `sce_delta`.
- RankMean (Perin et al., ACL Findings 2024, cited by arXiv 2605.29295): `rankmean_weights`.
"""

from __future__ import annotations

import torch


def check_fraction(name: str, value: float, low_open: bool = True) -> None:
    """Refuse a fraction outside ``(0, 1]`` (``[0, 1)`` with ``low_open=False``), naming the hyperparameter."""
    ok = 0 < value <= 1 if low_open else 0 <= value < 1
    if not ok:
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1)'}, got {value}")


def check_della(density: float, epsilon: float) -> None:
    """DELLA's keep probabilities ``density +- epsilon`` must lie in ``(0, 1)`` (below density 1)."""
    check_fraction("density", density)
    if epsilon < 0 or (density < 1 and not (0 < density - epsilon and density + epsilon < 1)):
        raise ValueError(f"epsilon must be >= 0 with density +- epsilon inside (0, 1), got density {density}, "
                         f"epsilon {epsilon}")


def _rescaled(tensor: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``tensor * mask`` scaled back to the L1 norm of `tensor` (mergekit's ``rescale: true``; unscaled when either
    norm is below `eps`)."""
    masked = tensor * mask
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magprune(task_vector: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
             rescale: str = "probability") -> torch.Tensor:
    """DELLA's MagPrune of one expert's task vector: within each row (a 1-D tensor is one row), entries ranked by
    magnitude get keep probabilities from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest),
    linear in the rank; a Bernoulli draw from `generator` keeps each entry. ``rescale="probability"`` divides each
    kept entry by its keep probability (the paper's ``1 / (1 - p_drop)``; the authors' code), ``"l1"`` rescales
    the whole tensor to its original L1 norm (mergekit 0.1.5's default), ``"none"`` keeps the values. Density 1 keeps
    everything and draws nothing (as mergekit). A row of one entry gets keep probability `density` (mergekit
    divides by zero there). Tensors of more than 2 dimensions are ranked over ``shape[0]`` rows."""
    if density >= 1:
        return task_vector
    rows = task_vector.unsqueeze(0) if task_vector.dim() < 2 else task_vector.reshape(task_vector.shape[0], -1)
    work = rows if rows.dtype == torch.bfloat16 or rows.device.type != "cpu" else rows.float()  # as mergekit
    sorted_indices = torch.argsort(rows.abs(), dim=1, descending=False)
    ranks = sorted_indices.argsort(dim=1).to(work.dtype) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = torch.where(high > low, ((ranks - low) / (high - low)).clamp(0, 1), 0.5)
    probabilities = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probabilities, generator=generator).to(work.dtype)
    if rescale == "probability":
        kept = work * mask / probabilities
    elif rescale == "l1":
        kept = _rescaled(work, mask)
    elif rescale == "none":
        kept = work * mask
    else:
        raise ValueError(f"rescale must be 'probability', 'l1' or 'none', got {rescale!r}")
    return kept.to(task_vector.dtype).reshape(task_vector.shape)


def breadcrumbs_prune(task_vector: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask of one expert's task vector over the whole tensor: of its ``n`` entries sorted by
    magnitude, drop the ``int(gamma * n)`` largest (outliers) and as many of the smallest as leave
    ``int(density * n)`` (fewer outliers are dropped when ``density + gamma > 1``); density 1 keeps everything
    (mergekit 0.1.5's ``magnitude_outliers``, no rescaling)."""
    if density >= 1:
        return task_vector
    numel = task_vector.numel()
    keep, top = int(density * numel), int(gamma * numel)
    bottom = max(0, numel - keep - top)
    magnitudes = task_vector.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    indices = torch.sort(magnitudes, descending=False).indices
    mask = torch.zeros(numel, dtype=task_vector.dtype, device=task_vector.device)
    mask[indices[bottom:bottom + keep]] = 1
    return task_vector * mask.reshape_as(task_vector)


def sign_consensus(weighted: torch.Tensor) -> torch.Tensor:
    """TIES' sign election over weighted task vectors ``(N, ...)``: True where an entry's sign is that of the sum over
    experts (a zero sum elects +; zero entries never agree). The same as peft's ``calculate_majority_sign_mask``
    and mergekit's ``get_mask(method="sum")``."""
    majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    return weighted.sign() == majority


def combine(pruned: torch.Tensor, weights: torch.Tensor, elect: bool, normalize: bool) -> torch.Tensor:
    """mergekit's generalized task arithmetic after sparsification, at ``lambda = 1``: weight each of `pruned`
    ``(N, ...)`` by `weights (N,)`; with `elect`, keep the entries whose sign agrees with the elected one
    (`sign_consensus`); sum; with `normalize`, divide by the summed weights of the entries kept (TIES' disjoint
    mean; an entry no expert keeps is left at 0). The caller multiplies by the scaling ``lambda``."""
    weights = weights.to(pruned).reshape((-1,) + (1,) * (pruned.dim() - 1))
    weighted = pruned * weights
    if elect:
        mask = sign_consensus(weighted)
        mixed = (weighted * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    return mixed


def model_stock_ratio(task_vectors: torch.Tensor) -> torch.Tensor:
    """Model Stock's interpolation ratio toward the experts' average, ``t = k cos / (1 + (k - 1) cos)`` with ``cos``
    the mean cosine between every pair of the ``k = N`` task vectors (each tensor flattened; mergekit's
    ``filter_wise: false``); 0 where the denominator vanishes (mergekit keeps the base there). A scalar tensor."""
    count = task_vectors.shape[0]
    if count < 2:
        raise ValueError(f"Model Stock needs at least 2 experts, got {count}")
    offsets = task_vectors.reshape(count, -1)
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            norms = torch.norm(offsets[i], dim=-1) * torch.norm(offsets[j], dim=-1)
            cosines.append(((offsets[i] * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos),
                       (count * cos) / torch.where(singular, torch.ones_like(denominator), denominator))


def model_stock_delta(task_vectors: torch.Tensor) -> torch.Tensor:
    """Model Stock's merged delta ``t * mean_i tau_i``: ``t * w_avg + (1 - t) * w_0`` minus the base ``w_0``."""
    return model_stock_ratio(task_vectors) * (task_vectors.sum(dim=0) / task_vectors.shape[0])


def _float_work(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.double() if tensor.dtype == torch.float64 else tensor.float()


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from `v0` (``t = 0``) to `v1` (``t = 1``), each tensor flattened: the angle between
    their directions, linear interpolation where they are (anti)parallel within `dot_threshold` (mergekit 0.1.5's
    ``slerp``; computed in float32, float64 inputs in float64)."""
    a, b = _float_work(v0).reshape(-1), _float_work(v1).reshape(-1)
    t = torch.tensor(t, dtype=a.dtype, device=a.device)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(v0.shape)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """NuSLERP of two task vectors, each flattened (mergekit 0.1.5's ``nuslerp`` with a base model and
    ``nuslerp_flatten: true``): ``(sin((1 - t) theta) v0 + sin(t theta) v1) / sin theta`` with theta the angle
    between them, linear where they are colinear. Unlike `slerp`, the norms are not normalised away: a zero task
    vector counts as orthogonal. `t` is ``w1 / (w0 + w1)``."""
    flat0, flat1 = v0.reshape(-1), v1.reshape(-1)
    unit0 = flat0 / torch.norm(flat0, dim=-1, keepdim=True).clamp(min=1e-7)
    unit1 = flat1 / torch.norm(flat1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(unit0 * unit1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    result = (torch.sin((1 - t) * theta) * flat0 + torch.sin(t * theta) * flat1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * flat0 + t * flat1, result).reshape(v0.shape)


def multislerp(task_vectors: torch.Tensor, weights: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """mergekit 0.1.5's ``multislerp`` around the base (barycentric interpolation on the sphere): the task vectors'
    directions averaged with `weights (N,)` (normalised to sum 1), the tangent-space mean mapped back, scaled to the
    weighted mean norm. One expert: its task vector. Where the weighted directions cancel, the weighted linear mean
    (mergekit does that for two experts and raises for more; a release contest must not stop on one tensor)."""
    count = task_vectors.shape[0]
    if count == 1:
        return task_vectors[0]
    flat = task_vectors.reshape(count, -1)
    weights = weights.to(flat)
    weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        return (task_vectors * weights.reshape((-1,) + (1,) * (task_vectors.dim() - 1))).sum(0)
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    return (result * (norms.squeeze(-1) * weights).sum()).view(task_vectors.shape[1:])


def sce_delta(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """SCE (Select, Calculate, Erase; arXiv 2408.07990) as mergekit 0.1.5's ``sce``: *select* the `select_topk`
    fraction of entries (of those that vary at all) with the largest variance across experts, zero the rest in
    every expert; *calculate* each expert's weight as its mean squared selected entry, normalised to sum 1; *erase*
    entries whose sign disagrees with the elected one (`sign_consensus`); the weighted mean of what is left.
    Departure: mergekit falls back to equal weights when the weights sum below 1e-6 (absolute), which LoRA deltas
    of a real model reach (entries ~1e-4); here only when they sum to 0."""
    check_fraction("select_topk", select_topk)
    if select_topk < 1:
        variance = torch.var(task_vectors, dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * select_topk)
        mask = torch.zeros_like(variance)
        if k > 0:
            mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
        task_vectors = task_vectors * mask.unsqueeze(0)
    erase = sign_consensus(task_vectors)
    weights = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if total == 0 else weights / total
    erased = weights.reshape((-1,) + (1,) * (task_vectors.dim() - 1)) * erase
    return (task_vectors * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)


def rankmean_weights(magnitudes: torch.Tensor) -> torch.Tensor:
    """RankMean's merging coefficients per group of layers, ``(N, G)`` from each expert's total absolute change per
    group ``magnitudes (N, G)``: each expert ranks the groups by its change (1 = least changed, G = most; ties by
    group order, as the authors' stable sort), and group g takes ``p_i(g) = r_i(g) / sum_j r_j(g)``. The authors'
    code (github VITA-Group/RankMean, ``rankmean``) merges two experts with ``p`` and ``1 - p`` per transformer
    block; this is the same formula for N experts."""
    order = torch.argsort(magnitudes, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, magnitudes.shape[1] + 1, device=magnitudes.device).expand_as(order))
    ranks = ranks.to(torch.float64)
    return ranks / ranks.sum(dim=0, keepdim=True)
