"""MERGEvolve beyond the experts' span (issue 17, part 2): from a poor and a good merge, over a sigma sweep.

    python -m benchmarks.mergevolve [--preset tiny] [--starts poor good] [--seeds 0 1 2 3] [--sigmas 0.01 0.1 0.3 1.0] [--generations 8]

On a zoo preset's multi-task unseen setting (default: the tiny zoo) (search part capped at 32 examples per task, 30% of each validation file
held out for selection, normalised fitness as in a search run), MERGEvolve starts from

* a *poor* merge: the model soup (every coefficient 1/N), and
* a *good* merge: task arithmetic with its scale tuned on the search part,

and runs `--generations` generations of 2 x `--pairs` + 1 evaluations at each sigma (relative to each layer's
delta; 0.01 barely leaves the span). Per run: the start's and the final centre's fitness on the search and selection
parts, the raw test mean, and the final centre's span residual (the relative norm of its delta outside the
experts' span). Resumable: finished runs are kept in ``benchmarks/results/mergevolve/rows.jsonl`` (other presets:
``mergevolve_<preset>/``); the report is the preset's MERGEvolve section of ``benchmarks/results/beyond_hull.md``
(the rest of that file is written by hand and kept).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from evox_merge.algorithms.mergevolve import MERGEvolve
from evox_merge.experts import ExpertSet
from evox_merge.experts.kernel import span_report
from evox_merge.experts.spaces import PerturbationSpace
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.normalisation import anchor_normalisation
from evox_merge.problems.static_merges import StaticMerge, tune_static_merge
from evox_merge.run.config import check_device
from evox_merge.run.loop import search
from evox_merge.run.zoo_search import zoo_paths
from evox_merge.tasks import read_task, split_task
from evox_merge.util.machine import machine_markdown
from evox_merge.util.report_text import replace_section

OUT = Path("benchmarks/results/mergevolve")
REPORT = Path("benchmarks/results/beyond_hull.md")


def fitness(problem: MergeProblem, merge: StaticMerge) -> float:
    return float(problem.aggregate(merge.score(problem).unsqueeze(0))[0])


def _device(device: str) -> str:
    """The --device argument, checked as a search config's `device` is (before any model loads)."""
    try:
        return check_device(device)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="zoo preset (its cached build)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.1, 0.3, 1.0])
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--max-validation", type=int, default=32)
    parser.add_argument("--starts", nargs="+", choices=("poor", "good"), default=["poor", "good"],
                        help="which starting merges to evolve (a bigger model: only the good one, to fit the machine)")
    parser.add_argument("--device", default="cpu", type=_device, help="where the model scores candidates, e.g. cuda")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base, adapters, _, unseen = zoo_paths(args.preset, 0, None)
    out = OUT if args.preset == "tiny" else OUT.with_name(f"mergevolve_{args.preset}")
    experts = ExpertSet.load(base, adapters, device=args.device)
    parts = [split_task(read_task(spec), 0.3, args.max_validation) for spec in unseen]
    search_part = MergeProblem(experts, [s for s, _ in parts], batch_size=128)
    search_part.normalise(anchor_normalisation(search_part))
    selection = MergeProblem(experts, [s for _, s in parts], batch_size=128).normalise(search_part.normalisation)
    test = MergeProblem(experts, [read_task(spec.with_split("test")) for spec in unseen], batch_size=128)
    labels = {"poor": ("poor (model soup)", "model_soup"), "good": ("good (task arithmetic)", "task_arithmetic")}
    starts = {labels[s][0]: tune_static_merge(labels[s][1], search_part) for s in args.starts}
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    done = {(r["start"], r["sigma"], r["seed"]) for r in map(json.loads, rows_path.read_text().splitlines())} if (
        rows_path.exists()) else set()
    for label, start in starts.items():
        for sigma in args.sigmas:
            for seed in args.seeds:
                if (label, sigma, seed) in done:
                    continue
                started = time.perf_counter()
                space = PerturbationSpace(list(experts.layers), experts.expert_names,
                                          start.merged_deltas(experts.layers), rank=args.rank, sigma=sigma)
                problem = MergeProblem(experts, search_part.tasks, batch_size=128, space=space)
                problem.normalise(search_part.normalisation)
                algorithm = MERGEvolve(space, pairs=args.pairs, learning_rate=1.0, seed=seed)
                search(algorithm, problem, args.generations)
                final = StaticMerge("mergevolve", {}, deltas=algorithm.centre_deltas())
                row = {"start": label, "sigma": sigma, "seed": seed, "generations": args.generations,
                       "pairs": args.pairs, "rank": args.rank,
                       "start_search": fitness(search_part, start), "final_search": fitness(search_part, final),
                       "start_selection": fitness(selection, start), "final_selection": fitness(selection, final),
                       "start_test": float(start.score(test).mean()), "final_test": float(final.score(test).mean()),
                       "span_residual": span_report(experts.layers, experts.num_experts, final.deltas)["relative"],
                       "seconds": time.perf_counter() - started, "device": args.device}
                with open(rows_path, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    write_report([json.loads(line) for line in rows_path.read_text().splitlines()], args, len(unseen))


def write_report(rows: list[dict], args, tasks: int) -> None:
    def mean(values):
        return f"{statistics.mean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")

    lines = ["| start | sigma | runs | search: start -> final | selection: start -> final | test: start -> final "
             "| span residual | s / run |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label in dict.fromkeys(r["start"] for r in rows):
        for sigma in sorted({r["sigma"] for r in rows if r["start"] == label}):
            group = [r for r in rows if r["start"] == label and r["sigma"] == sigma]
            lines.append(
                f"| {label} | {sigma} | {len(group)} | {group[0]['start_search']:.4f} -> "
                f"{mean([r['final_search'] for r in group])} | {group[0]['start_selection']:.4f} -> "
                f"{mean([r['final_selection'] for r in group])} | {group[0]['start_test']:.4f} -> "
                f"{mean([r['final_test'] for r in group])} | {mean([r['span_residual'] for r in group])} | "
                f"{statistics.mean(r['seconds'] for r in group):.0f} |")
    text = f"""## MERGEvolve on the `{args.preset}` zoo

Command: `python -m benchmarks.mergevolve {' '.join(f'--{k.replace("_", "-")} {" ".join(map(str, v)) if isinstance(v, list) else v}' for k, v in vars(args).items())}`

The `{args.preset}` zoo, multi-task unseen ({tasks} tasks), search part at most {args.max_validation} examples per task,
selection part 30% of each validation file, fitness normalised (0 = base, 1 = best single expert per task); test =
raw mean over every test example. MERGEvolve: {args.generations} generations x ({args.pairs} antithetic pairs + the
centre), rank-{args.rank} perturbations, sigma relative to each layer's delta; mean ± std over seeds.

{chr(10).join(lines)}

Machine:
{machine_markdown()}
"""
    REPORT.write_text(replace_section(REPORT, f"mergevolve-{args.preset}", text,
                                      "# Beyond the hull: search spaces and MERGEvolve\n"))
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
