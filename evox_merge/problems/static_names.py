"""The static merges' names, readable without importing torch: configs (``release.baselines``, a sweep's
``methods``) are checked against them before anything heavy loads. `evox_merge.problems.static_merges.STATIC_MERGES`
maps each name to its merge, in this order (tests/test_fast_refusals.py checks they agree)."""

STATIC_MERGE_NAMES = ("base", "best_single", "model_soup", "task_arithmetic", "ties", "dare", "della", "della_linear",
                      "breadcrumbs", "breadcrumbs_ties", "model_stock", "slerp", "nuslerp", "multislerp", "sce",
                      "rankmean")

RANDOM_STATIC_MERGES = ("dare", "della", "della_linear")
"""The static merges that draw random drop masks from the run's seed: a sweep runs them once per seed (the others
once per task group)."""
