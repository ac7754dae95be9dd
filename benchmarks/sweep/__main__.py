"""Benchmark sweep: EvoGM against CMA-ES, PSO, random search and static merges at equal evaluation budgets.

    python -m benchmarks.sweep benchmarks/configs/sweep_tiny.yaml     (same as: evox-merge bench CONFIG)

Resumable: rerun the same command and finished cells are skipped. Needs the ``bench`` extra (scipy).
"""

import argparse
import sys

from benchmarks.sweep.runner import run_sweep
from evox_merge.util.errors import EvoxMergeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="sweep config (YAML)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        print(f"sweep results in {run_sweep(args.config, progress=not args.quiet)}")
    except EvoxMergeError as error:
        print(f"sweep: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
