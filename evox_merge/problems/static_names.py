"""The static merges' names, readable without importing torch: configs (``release.baselines``, a sweep's
``methods``) are checked against them before anything heavy loads. `evox_merge.problems.static_merges.STATIC_MERGES`
maps each name to its merge, in this order (tests/test_fast_refusals.py checks they agree)."""

STATIC_MERGE_DESCRIPTIONS = {
    "base": "the base model alone (every coefficient 0)",
    "best_single": "the expert that scores best on the search part",
    "model_soup": "the uniform average of the experts (arXiv 2203.05482)",
    "task_arithmetic": "every task vector times one scale, tuned on a grid (arXiv 2212.04089)",
    "ties": "trim, elect sign, disjoint mean of the task vectors (arXiv 2306.01708)",
    "dare": "DARE-TIES: random drop and rescale, then TIES (arXiv 2311.03099)",
    "della": "DELLA: magnitude-ranked drop probabilities, then TIES's sign election (arXiv 2406.11617)",
    "della_linear": "DELLA's drop without the sign election",
    "breadcrumbs": "Model Breadcrumbs: drop the largest and smallest entries (arXiv 2312.06795)",
    "breadcrumbs_ties": "Breadcrumbs' masks with TIES's sign election",
    "model_stock": "Model Stock: the interpolation ratio from the experts' angles (arXiv 2403.19522)",
    "slerp": "SLERP of the two best experts' weights, t tuned on a grid",
    "nuslerp": "NuSLERP (mergekit) of the two best experts' task vectors, t tuned on a grid",
    "multislerp": "spherical barycentre of N experts (mergekit's multislerp)",
    "sce": "SCE: select by variance, calculate sign-aware weights, erase (arXiv 2408.07990)",
    "rankmean": "RankMean: per-block coefficients from the ranks of the experts' changes (Perin et al., 2024)",
    "fisher": "Fisher merging: diagonal Fisher of each expert on the search part (arXiv 2111.09832)",
    "regmean": "RegMean: per linear layer, closed form from input Gram matrices (arXiv 2212.09849)",
    "adamerging": "AdaMerging: task-wise coefficients by entropy minimisation (arXiv 2310.02575)",
    "adamerging_layer": "AdaMerging, layer-wise coefficients",
    "adamerging_supervised": "AdaMerging's coefficients learned on the search part's labels (supervised loss)",
}
"""One line per static merge, for `evox-merge merges` and the docs."""

STATIC_MERGE_NAMES = tuple(STATIC_MERGE_DESCRIPTIONS)

LINEAR_STATIC_MERGES = ("base", "best_single", "model_soup", "task_arithmetic")
"""The static merges whose result is a point in the expert basis (``merge.coefficients``): the only ones a search
can start from (`evox_merge.run.registry.start_points`); the others are merged task vectors."""

DATA_AWARE_STATIC_MERGES = ("fisher", "regmean", "adamerging", "adamerging_layer", "adamerging_supervised")
"""The static merges computed from the search part's examples (backward passes, Gram matrices): several times a
data-free merge's time and memory (benchmarks/results/data_aware_merges.md), so the release contest holds them only
when ``release.baselines`` names them."""

CONTEST_STATIC_MERGES = ("base", "best_single", "model_soup", "task_arithmetic", "ties", "dare")
"""The release contest's static merges with ``release.baselines: true`` (the default). The others compete when
``release.baselines`` names them (or is ``all``): each merged-delta method holds one dense delta per target for the
contest (about 0.5 GB each on SmolLM2-135M with 6 experts: with the 16 data-free merges a search there peaked at
9.1 GiB, and tuning and scoring them took about 77 of its 92 minutes, the searched candidates 15:
benchmarks/results/harness_smollm2.md)."""

RANDOM_STATIC_MERGES = ("dare", "della", "della_linear")
"""The static merges that draw random drop masks from the run's seed: a sweep runs them once per seed (the others
once per task group)."""
