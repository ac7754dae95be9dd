"""The run layer: the only place that wires an algorithm to a problem.

Config and the algorithm registry, the generation loop with its monitor and records, checkpoints, distributed
ranks, release selection and the release packet. `run_search` is the entry point; the CLI and the benchmark sweep
use it (or `run_generations` for in-memory searches).
"""
