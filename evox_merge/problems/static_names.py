"""The static merges' names, readable without importing torch: configs (``release.baselines``, a sweep's
``methods``) are checked against them before anything heavy loads. `evox_merge.problems.static_merges.STATIC_MERGES`
maps each name to its merge, in this order (tests/test_fast_refusals.py checks they agree)."""

STATIC_MERGE_NAMES = ("base", "best_single", "model_soup", "task_arithmetic", "ties", "dare")
