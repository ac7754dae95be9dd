"""Benchmark sweep: EvoGM against CMA-ES, PSO, random search and static merges at equal evaluation budgets.

    python -m benchmarks.sweep benchmarks/configs/sweep_tiny.yaml     (same as: evox-merge bench CONFIG)

Resumable: rerun the same command and finished cells are skipped. Needs the ``bench`` extra (scipy).
"""

import sys

from evox_merge.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
