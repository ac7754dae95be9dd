"""Does the out-of-bag estimate say what the release contest gains on new data? Checked against test.

    python -m benchmarks.out_of_bag [--settings single_task_unseen multi_task_unseen] [--methods evogm] [--seeds 0 1 2]

For each run (a search of the sweep config's tasks, method and seed, as `benchmarks.sweep` runs it), the contest of
`evox-merge search` is held: the search's top-k candidates and the static merges (`product_statics`, tuned on the
search part) on the selection part. Three numbers per run, all in normalised fitness:

- ``naive``: the winner's selection-part fitness minus the best static merge's (0 when a static merge wins): the
  point estimate of `selection_margin`, biased upwards because the winner was picked on those examples;
- ``oob``: `evox_merge.run.selection.contest_out_of_bag`, the contest rerun on resamples of the selection part and
  judged on the examples each resample left out;
- ``realized``: what the contest actually gained on the test files: the winner's normalised test fitness minus that
  of the best static merge on the selection part (0 when a static merge wins).

Rows (resumable: finished runs are skipped) in ``<out>/rows.jsonl``; ``<out>.md`` (and a scatter plot) compares
the estimates with what was realized. Never used to choose anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.sweep import cells
from benchmarks.sweep.config import load_sweep_config
from evox_merge.run.loop import search
from evox_merge.run.selection import (contest_out_of_bag, release_rival, searched_candidates, select_release,
                                      static_candidates)
from evox_merge.util.machine import machine_markdown

OUT = "benchmarks/results/out_of_bag"


def _fitness(problem, merge) -> float:
    return float(problem.aggregate(merge.score(problem).unsqueeze(0))[0])


def run_one(setup, config, setting: str, tasks: tuple[str, ...], method: str, seed: int, statics_cache: dict) -> dict:
    """One search and its contest; the estimates and the realized gain."""
    started = time.perf_counter()
    search_problem, selection, test = cells._problems(setup, config, tasks, seed)
    torch.manual_seed(seed)
    algorithm, generations = cells.build_search_algorithm(method, setup.experts.num_experts, config.budgets["paper"],
                                                          seed, config.evogm_params, space=search_problem.space)
    monitor = search(algorithm, search_problem, generations)
    if tasks not in statics_cache:  # the static merges of a task group are the same for every seed
        statics_cache[tasks] = static_candidates(search_problem, list(config.product_statics))
    statics = statics_cache[tasks]
    for static in statics:  # fresh contest state: scored on this run's selection part
        static.selection_fitness = static.selection_parts = None
    candidates = searched_candidates(monitor.records, config.selection_top_k) + statics
    winner = select_release(candidates, selection)
    best_static = select_release(statics, selection)
    rival = release_rival(winner, candidates)
    oob = contest_out_of_bag(candidates, selection, seed=seed)
    test_winner = _fitness(test, winner.merge)
    test_static = test_winner if winner is best_static else _fitness(test, best_static.merge)
    return {"setting": setting, "tasks": list(tasks), "method": method, "seed": seed, "winner": winner.name, "winner_kind": winner.kind,
            "best_static": best_static.name, "rival": rival.name if rival else None,
            "naive": winner.selection_fitness - best_static.selection_fitness, "oob": oob,
            "realized": test_winner - test_static, "seconds": time.perf_counter() - started}


def _correlation(xs: list[float], ys: list[float]) -> str:
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return ""
    return f"{statistics.correlation(xs, ys):+.2f}"


def _setting(row: dict) -> str:
    return row.get("setting", "single_task_unseen" if len(row["tasks"]) == 1 else "multi_task_unseen")


def _commands(rows: list[dict], config: str) -> list[str]:
    """The commands that give these rows: one per setting, with the methods and seeds its rows have."""
    commands = []
    for setting in dict.fromkeys(map(_setting, rows)):
        members = [r for r in rows if _setting(r) == setting]
        methods = " ".join(dict.fromkeys(r["method"] for r in members))
        seeds = " ".join(map(str, sorted({r["seed"] for r in members})))
        commands.append(f"`python -m benchmarks.out_of_bag --config {config} --settings {setting} --methods {methods} "
                        f"--seeds {seeds}`")
    return commands


def report(rows: list[dict], out: Path, config: str) -> str:
    """Markdown: per setting, the mean of each estimate against the mean realized gain, and their correlation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| setting | runs | searched won | naive margin (mean) | out-of-bag (mean) | realized on test (mean) | "
             "realized - naive | realized - out-of-bag | corr(naive, realized) | corr(out-of-bag, realized) |",
             "|" + " --- |" * 10]
    groups = {"single-task": [r for r in rows if len(r["tasks"]) == 1],
              "multi-task": [r for r in rows if len(r["tasks"]) > 1], "all": rows}
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for group, members in groups.items():
        members = [r for r in members if r["oob"] is not None]
        if not members:
            continue
        naive = [r["naive"] for r in members]
        oob = [r["oob"]["gain"] for r in members]
        realized = [r["realized"] for r in members]
        won = sum(r["winner_kind"] == "searched" for r in members)
        lines.append(f"| {group} | {len(members)} | {won} | {statistics.mean(naive):+.4f} | {statistics.mean(oob):+.4f} | "
                     f"{statistics.mean(realized):+.4f} | {statistics.mean(realized) - statistics.mean(naive):+.4f} | "
                     f"{statistics.mean(realized) - statistics.mean(oob):+.4f} | {_correlation(naive, realized)} | "
                     f"{_correlation(oob, realized)} |")
        if group != "all":
            axes[0].scatter(naive, realized, s=14, label=group)
            axes[1].scatter(oob, realized, s=14, label=group)
    for axis, name in zip(axes, ("naive margin on the selection part", "out-of-bag estimate")):
        low, high = axis.get_xlim()
        axis.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
        axis.axhline(0, color="black", linewidth=0.5)
        axis.set_xlabel(name)
        axis.legend()
    axes[0].set_ylabel("realized gain on test (normalised fitness)")
    figure.suptitle("What the release contest gains over the best static merge: estimated vs realized")
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(figure)
    return "\n".join([
        "# The release contest's gain: the naive margin, the out-of-bag estimate, and test",
        "",
        "Commands (resumable; `--report-only` rewrites this file from the rows): " + "; ".join(_commands(rows, config))
        + f". Rows: `{out.name}/rows.jsonl`.",
        "",
        __doc__.split("\n\n", 2)[2].split("Rows (resumable")[0].strip(),
        "",
        "All in normalised fitness (0 = base, 1 = best single expert per task). A good estimate has realized minus "
        "estimate near 0 on average and a high correlation with what was realized, run by run.",
        "",
        *lines,
        "",
        f"![estimates against test]({out.name}.png)",
        "",
        f"Total time: {sum(r['seconds'] for r in rows) / 60:.1f} minutes of runs (one thread each).",
        "",
        "Machine:",
        machine_markdown(),
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="benchmarks/configs/search_quality.yaml")
    parser.add_argument("--settings", nargs="+", default=["single_task_unseen", "multi_task_unseen"])
    parser.add_argument("--methods", nargs="+", default=["evogm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = load_sweep_config(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    if not args.report_only:
        setup = cells._cached_setup(config.setup.model_dump_json())
        groups = {"single_task_unseen": [(name,) for name in setup.unseen],
                  "multi_task_unseen": [tuple(setup.unseen)], "multi_task_seen": [tuple(setup.seen)]}
        done = {(tuple(r["tasks"]), r["method"], r["seed"]) for r in map(json.loads, rows_path.read_text().splitlines())
                } if rows_path.exists() else set()
        statics: dict = {}
        for setting in args.settings:
            for tasks in groups[setting]:
                for method in args.methods:
                    for seed in args.seeds:
                        if (tasks, method, seed) in done:
                            continue
                        row = run_one(setup, config, setting, tasks, method, seed, statics)
                        with open(rows_path, "a") as handle:
                            handle.write(json.dumps(row) + "\n")
                        print(f"{'+'.join(tasks)[:40]} {method} seed {seed}: winner {row['winner']}, naive "
                              f"{row['naive']:+.4f}, oob {row['oob']['gain'] if row['oob'] else float('nan'):+.4f}, "
                              f"realized {row['realized']:+.4f}", flush=True)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    out.with_suffix(".md").write_text(report(rows, out, args.config))


if __name__ == "__main__":
    main()
