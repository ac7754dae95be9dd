"""Memory, time and search-part quality of the data-aware static merges (issue 32 point 2): Fisher merging, RegMean
and AdaMerging (evox_merge/problems/data_aware.py, evox_merge/problems/adamerging.py), task arithmetic beside them.

    python -m benchmarks.data_aware_merges run --zoo ~/.cache/evox-merge/zoo/tiny-seed0
    python -m benchmarks.data_aware_merges run --zoo ~/.cache/evox-merge/zoo/smollm2-seed0 --tasks 4 --max-validation 10
    python -m benchmarks.data_aware_merges report      # benchmarks/results/data_aware_merges.md from the rows

Each method runs in a fresh process (so its peak resident memory is its own): the zoo's first ``--tasks`` seen tasks,
split as a run splits them (selection fraction 0.3, the search part capped at ``--max-validation`` examples); the
method is tuned on the search part (normalised: 0 = base, 1 = best single expert, as a run), its pick scored on the
selection part. Test is never read. Rows are appended to benchmarks/results/data_aware_merges.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("benchmarks/results/data_aware_merges.jsonl")
REPORT = Path("benchmarks/results/data_aware_merges.md")
METHODS = ["task_arithmetic", "fisher", "regmean", "adamerging", "adamerging_layer", "adamerging_supervised"]
SELECTION_FRACTION = 0.3


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(zoo_dir: str, method: str, tasks: int, max_validation: int, threads: int) -> dict:
    """One method on one zoo, in this process: the row."""
    import torch

    from evox_merge.experts import ExpertSet
    from evox_merge.problems.merge_problem import MergeProblem
    from evox_merge.problems.normalisation import anchor_normalisation
    from evox_merge.problems.static_merges import tune_static_merge
    from evox_merge.tasks import read_task, split_task
    from evox_merge.zoo.loading import load_zoo

    torch.set_num_threads(threads)
    zoo = load_zoo(zoo_dir)
    specs = zoo.seen_tasks[:tasks]
    parts = [split_task(read_task(spec), SELECTION_FRACTION, max_validation) for spec in specs]
    experts = ExpertSet.load(zoo.base_dir, zoo.adapter_dirs)
    search = MergeProblem(experts, [s for s, _ in parts], batch_size=8)
    search.normalise(anchor_normalisation(search))
    selection = MergeProblem(experts, [s for _, s in parts], batch_size=8).normalise(search.normalisation)
    loaded = _rss_mb()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    merge = tune_static_merge(method, search)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    peak = _rss_mb()
    chosen = {k: v for k, v in merge.settings.items() if k not in ("operator", "coefficients", "objective_history",
                                                                   "grid")}
    selection_fitness = float(selection.aggregate(merge.score(selection).unsqueeze(0))[0])
    return {"zoo": zoo.preset, "method": method, "tasks": [s.name for s in specs], "experts": experts.num_experts,
            "targets": len(experts.target_names),
            "search_examples": sum(len(s.records) for s, _ in parts), "threads": threads,
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "rss_loaded_mb": round(loaded, 1),
            "rss_peak_mb": round(peak, 1), "rss_added_mb": round(peak - loaded, 1),
            "search_fitness": round(merge.fitness, 4), "selection_fitness": round(selection_fitness, 4),
            "settings": chosen}


def run(args: argparse.Namespace) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        command = [sys.executable, "-m", "benchmarks.data_aware_merges", "one", "--zoo", args.zoo, "--method", method,
                   "--tasks", str(args.tasks), "--max-validation", str(args.max_validation),
                   "--threads", str(args.threads)]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{method} failed")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row["load"] = os.getloadavg()[0]
        with open(OUT, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row))


def report(_: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in OUT.read_text().splitlines() if line.strip()]
    lines = ["# Data-aware static merges: memory, time, search-part quality", "",
             "Fisher merging (arXiv 2111.09832), RegMean (arXiv 2212.09849) and AdaMerging (arXiv 2310.02575) as "
             "static merges (`evox_merge/problems/data_aware.py`, `evox_merge/problems/adamerging.py`), tuned on the "
             "search part like task arithmetic (shown for scale). Generated by `python -m benchmarks.data_aware_merges "
             "report` from benchmarks/results/data_aware_merges.jsonl; each row one method in a fresh process.", "",
             "**The machine was loaded** (2 shared CPU cores, other jobs running; `load` is the 1-minute load "
             "average when the row finished): wall and CPU seconds are upper bounds, good to a factor of about 2, "
             "not a benchmark. `rss added` is the process's peak resident memory during the tuning minus its peak "
             "after loading the model and tasks (the method's own memory: statistics, activations, graphs). "
             "Fitness is normalised per task (0 = base, 1 = best single expert on the search part); the selection "
             "part is held out from the tuning. Test is never read.", ""]
    for zoo in dict.fromkeys(r["zoo"] for r in rows):
        group = [r for r in rows if r["zoo"] == zoo]
        first = group[0]
        lines += [f"## {zoo}: {first['experts']} experts, {first['targets']} targets, tasks {', '.join(first['tasks'])}"
                  f" ({first['search_examples']} search examples), {first['threads']} thread(s)", "",
                  "| method | wall s | CPU s | rss added MB | peak MB | search fitness | selection fitness | chosen "
                  "| load |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in group:
            chosen = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in r["settings"].items() if k not in ("box", "lr", "init", "steps", "floor"))
            lines.append(f"| {r['method']} | {r['wall_s']} | {r['cpu_s']} | {r['rss_added_mb']} | {r['rss_peak_mb']} "
                         f"| {r['search_fitness']} | {r['selection_fitness']} | {chosen} | {r['load']:.1f} |")
        lines.append("")
    lines += ["Note: the tiny rows of Fisher and RegMean were measured when their running sums were float64 (now "
              "float32, as the smollm2 rows): their `rss added` is an upper bound of today's; their fitness does not "
              "depend on it beyond rounding.", "",
              "## What each method holds", "",
              "- Fisher: per target, two float32 running sums the size of the target (`sum_i F_i tau_i`, "
              "`sum_i F_i`), one expert's float32 Fisher and the targets' gradients; one backward pass per search "
              "example per expert.",
              "- RegMean: per Linear target, float32 `sum_i G_i` (in x in) and `sum_i tau_i G_i` (out x in), each "
              "expert's `diag G_i`, and one expert's Gram matrices while its forward passes run (hooks add each "
              "batch's `X^T X` over real tokens); the closed form solved in float64 per target.",
              "- AdaMerging: the coefficients, the differentiable merged weights of the targets and one batch's "
              "graph; `steps + 1` forward passes (and `steps` backward) over the search part.", ""]
    REPORT.write_text("\n".join(lines))
    print(f"wrote {REPORT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "one"):
        p = sub.add_parser(name)
        p.add_argument("--zoo", default=str(Path.home() / ".cache/evox-merge/zoo/tiny-seed0"))
        p.add_argument("--tasks", type=int, default=8)
        p.add_argument("--max-validation", type=int, default=32)
        p.add_argument("--threads", type=int, default=1)
        if name == "run":
            p.add_argument("--methods", nargs="+", default=METHODS)
        else:
            p.add_argument("--method", required=True)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "one":
        print(json.dumps(measure(args.zoo, args.method, args.tasks, args.max_validation, args.threads)))
    elif args.command == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
