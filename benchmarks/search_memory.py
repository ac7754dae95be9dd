"""Peak memory of a search's own loop on a zoo preset: the default `search --zoo` run, cut to a few generations and
without the static merges' release contest, so the peak is the search's (one model, the experts' factors and a
scored batch), not the baselines'.

    python -m benchmarks.search_memory --preset smollm2 --batch-size 128 --generations 2 [--full-logits]

Prints the process's peak RSS (``ru_maxrss``) and the wall seconds; the run's files go to a temporary folder.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

from evox_merge.run.config import load_config
from evox_merge.run.search import run_search
from evox_merge.run.zoo_search import zoo_search_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--full-logits", action="store_true",
                        help="score through the model's whole logits (the path before evox_merge.tasks.logprobs)")
    args = parser.parse_args()
    if args.full_logits:
        import evox_merge.tasks.logprobs as logprobs_module

        logprobs_module._checked_head = lambda model, copies: None
    with tempfile.TemporaryDirectory() as out:
        data = zoo_search_config(out=out, preset=args.preset).model_dump(mode="json")
        data["budget"]["generations"] = args.generations
        data["release"]["baselines"] = False
        data["batch_size"] = args.batch_size
        started = time.perf_counter()
        run_search(load_config(data), overwrite=True, progress="quiet")
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(f"preset {args.preset}, batch_size {args.batch_size}, {args.generations} generations"
          f"{', full logits' if args.full_logits else ''}: peak RSS "
          f"{peak:.2f} GiB, {seconds:.0f} s")


if __name__ == "__main__":
    main()
