"""Benchmark sweep: EvoGM against CMA-ES, PSO, random search and static merges at equal evaluation budgets.

    python -m benchmarks.sweep benchmarks/configs/sweep_tiny.yaml     (same as: evox-merge bench CONFIG)

Resumable: rerun the same command and finished cells are skipped. ``--report-only`` writes results.md from the
cells finished so far without running any. Needs the ``bench`` extra (scipy).
"""

import sys

from evox_merge.cli import main

if __name__ == "__main__":
    if "--report-only" in sys.argv[1:]:
        from benchmarks.sweep.runner import run_sweep

        config = [arg for arg in sys.argv[1:] if not arg.startswith("--")][0]
        print(f"sweep results in {run_sweep(config, progress=False, report_only=True)}")
        sys.exit(0)
    sys.exit(main(["bench", *sys.argv[1:]]))
