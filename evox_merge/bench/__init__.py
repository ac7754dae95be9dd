"""Benchmark sweeps: EvoGM against CMA-ES, PSO, random search and static merges at equal budgets."""
