"""Benchmarks of evox-merge; results are committed under benchmarks/results/."""
