"""The benchmark sweep runner: a grid of settings x methods x seeds x budgets on one merging setup, run with the
library's run layer like any user would. ``python -m benchmarks.sweep CONFIG``."""
