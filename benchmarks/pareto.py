"""Multi-objective search on the tiny zoo: NSGA-II, Pareto EvoGM and random search at an equal budget.

Objectives (normalised: 0 = base, 1 = best single expert per task, anchored on the search part): the mean of the
zoo's five unseen generation tasks (``mix_*``) and the mean of its five unseen multiple-choice tasks (``choose_*``).
Each run searches on the search part (``selection_fraction`` 0.3 held out, as a search run does), then every member
of its non-dominated archive (search-part objective values) is scored on the *test* files; the run's score is the
exact hypervolume of the non-dominated test points, reference point -1 in both objectives (the same for every run:
`evox_merge.run.objectives.HV_REFERENCE`). Welch's t-test of each method against Pareto EvoGM over seeds.

    python -m benchmarks.pareto                       # the full run: 4 seeds x 3 methods, 160 evaluations each
    python -m benchmarks.pareto --seeds 4 --pop 8 --generations 8 --max-validation 32 --max-test 100   # reduced

Resumable: one JSON line per finished (method, seed) in ``--out``/rows.jsonl; a rerun skips those (its settings must
match, they are stored in settings.json). Writes ``--out``/fronts.png and the Markdown report (``--report``); the
reading written by hand below the report's marker is kept. Defaults: the full run writes ``benchmarks/results/pareto/``
and ``pareto.md``, any other settings ``pareto_reduced/`` and ``pareto_reduced.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from benchmarks.sweep.report import welch_p
from evox_merge.algorithms.pareto import ParetoArchive, hypervolume
from evox_merge.experts import ExpertSet
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.normalisation import anchor_normalisation
from evox_merge.problems.static_merges import tune_static_merge
from evox_merge.run.loop import search
from evox_merge.run.objectives import HV_REFERENCE, Objectives, run_archive
from evox_merge.run.registry import build_algorithm, is_evogm, is_multi_objective
from evox_merge.tasks import read_task, split_task
from evox_merge.util.report_text import with_hand_written
from evox_merge.zoo import build_zoo, load_zoo

METHODS = ("evogm_pareto", "nsga2", "random")
STATICS = ("base", "best_single", "model_soup", "task_arithmetic")
ROOT = Path(__file__).resolve().parent / "results"


def _hv(points: torch.Tensor) -> float:
    return hypervolume(-points, torch.full((points.shape[1],), -HV_REFERENCE, dtype=torch.float64))


def setup(args):
    zoo = load_zoo(build_zoo(preset="tiny"))
    experts = ExpertSet.load(zoo.base_dir, zoo.adapter_dirs)
    specs = zoo.unseen_tasks
    parts = [split_task(read_task(spec), 0.3, args.max_validation)[0] for spec in specs]
    problem = MergeProblem(experts, parts, batch_size=64)
    problem.normalise(anchor_normalisation(problem))
    tests = [split_task(read_task(spec.with_split("test")), 0.0, args.max_test)[0] for spec in specs]
    test_problem = MergeProblem(experts, tests, batch_size=64).normalise(problem.normalisation)
    names = [spec.name for spec in specs]
    groups = (tuple(n for n in names if n.startswith("mix_")), tuple(n for n in names if n.startswith("choose_")))
    objectives = Objectives("pareto", ("generation", "multiple_choice"), groups)
    return experts, problem, test_problem, objectives


def run_one(method: str, seed: int, args, problem, test_problem, objectives) -> dict:
    params = {}
    if is_evogm(method):  # 2 rounds x (1 initial + T generated) populations fill the budget
        params = {"num_rounds": 2, "iterations_per_round": max(1, args.generations // 2 - 1)}
    vector = is_multi_objective(method)
    algorithm = build_algorithm(method, problem.num_experts, pop_size=args.pop, seed=seed, params=params,
                                n_objs=len(objectives.names) if vector else None)
    start = time.perf_counter()
    monitor = search(algorithm, problem, args.generations, objectives=objectives, objective_fitness=vector)
    seconds = time.perf_counter() - start
    records = monitor.records
    archive = run_archive(records, objectives.names)
    by_id = {r["id"]: r for r in records}
    members = [by_id[i] for i in archive.ids]
    test_scores = test_problem.evaluate_per_task(torch.tensor([m["coefficients"] for m in members]))
    test_values = objectives.values(test_problem, test_scores)
    test_archive = ParetoArchive()
    test_archive.update(list(range(len(members))), -test_values)
    search_points = torch.tensor([[m["objectives"][n] for n in objectives.names] for m in members],
                                 dtype=torch.float64)
    return {"method": method, "seed": seed, "evaluations": len(records), "seconds": seconds,
            "archive_size": len(members), "search_hv": _hv(search_points), "test_hv": _hv(-test_archive.points),
            "search_points": search_points.tolist(), "test_points": test_values.tolist(),
            "test_front": (-test_archive.points).tolist()}


def plot(rows: list[dict], statics: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in rows})
    figure, axes = plt.subplots(1, len(seeds), figsize=(4.5 * len(seeds), 4.2), squeeze=False)
    colours = {"evogm_pareto": "tab:red", "nsga2": "tab:blue", "random": "tab:gray"}
    for axis, seed in zip(axes[0], seeds):
        for row in (r for r in rows if r["seed"] == seed):
            front = sorted(row["test_front"])
            axis.plot([p[0] for p in front], [p[1] for p in front], marker="o", ms=3,
                      c=colours.get(row["method"]), label=f"{row['method']} (HV {row['test_hv']:.3f})")
        for name, (x, y) in statics.items():
            axis.scatter(x, y, marker="s", s=25)
            axis.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        axis.set_title(f"seed {seed}: test fronts")
        axis.set_xlabel("generation tasks (normalised)")
        axis.set_ylabel("multiple-choice tasks (normalised)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(rows: list[dict], statics: dict[str, list[float]], settings: dict, full: bool, fronts: str) -> str:
    lines = ["# Multi-objective search on the tiny zoo", "",
             ("**Full run.**" if full else "**Reduced run** (not the full one; the full command is below).") +
             f" Settings: {json.dumps(settings)}.", "",
             "Objectives: normalised mean of the 5 unseen generation tasks and of the 5 unseen multiple-choice tasks "
             "(0 = base, 1 = best single expert per task, anchored on the search part). Hypervolume of each run's "
             f"archive re-scored on the test files (non-dominated test points), exact, reference point "
             f"({HV_REFERENCE}, {HV_REFERENCE}) for every run. Welch's t-test against `evogm_pareto` over seeds.", "",
             "| method | seeds | test HV (mean ± std) | search HV (mean ± std) | archive size | s / run | "
             "p vs evogm_pareto |", "| --- | --- | --- | --- | --- | --- | --- |"]
    by_method = {m: [r for r in rows if r["method"] == m] for m in METHODS}
    reference = [r["test_hv"] for r in by_method["evogm_pareto"]]
    for method, method_rows in by_method.items():
        if not method_rows:
            continue
        test = torch.tensor([r["test_hv"] for r in method_rows], dtype=torch.float64)
        searched = torch.tensor([r["search_hv"] for r in method_rows], dtype=torch.float64)
        std = (lambda t: float(t.std()) if len(t) > 1 else math.nan)
        p = "" if method == "evogm_pareto" else f"{welch_p([r['test_hv'] for r in method_rows], reference):.3g}"
        lines.append(f"| {method} | {len(method_rows)} | {float(test.mean()):.4f} ± {std(test):.4f} | "
                     f"{float(searched.mean()):.4f} ± {std(searched):.4f} | "
                     f"{sum(r['archive_size'] for r in method_rows) / len(method_rows):.1f} | "
                     f"{sum(r['seconds'] for r in method_rows) / len(method_rows):.0f} | {p} |")
    lines += ["", "Per run (test HV):", "", "| method | " + " | ".join(
        f"seed {s}" for s in sorted({r['seed'] for r in rows})) + " |",
        "| --- |" + " --- |" * len({r['seed'] for r in rows})]
    for method, method_rows in by_method.items():
        cells = {r["seed"]: f"{r['test_hv']:.4f}" for r in method_rows}
        lines.append(f"| {method} | " + " | ".join(cells.get(s, "") for s in sorted({r['seed'] for r in rows})) + " |")
    lines += ["", "Static merges on test (generation, multiple choice): " + ", ".join(
        f"{name} ({x:.3f}, {y:.3f})" for name, (x, y) in statics.items()) + ".", "",
        f"![test fronts]({fronts})", "",
        "Full run: `python -m benchmarks.pareto` (4 seeds, population 16, 10 generations = 160 evaluations per run, "
        "all search-part examples, all 500 test examples per task). This report's command: "
        f"`python -m benchmarks.pareto {settings['argv']}`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--pop", type=int, default=16)
    parser.add_argument("--generations", type=int, default=10)
    parser.add_argument("--max-validation", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", help="rows, settings and plot (default: benchmarks/results/pareto for the full "
                        "run, pareto_reduced otherwise)")
    parser.add_argument("--report", help="Markdown report (default: the --out folder's name + .md beside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = {k: getattr(args, k) for k in ("seeds", "pop", "generations", "max_validation", "max_test")}
    full = settings == {"seeds": 4, "pop": 16, "generations": 10, "max_validation": None, "max_test": None}
    out = Path(args.out or ROOT / ("pareto" if full else "pareto_reduced"))
    report_path = Path(args.report or out.with_suffix(".md"))
    out.mkdir(parents=True, exist_ok=True)
    settings["argv"] = " ".join(argv if argv is not None else __import__("sys").argv[1:])
    saved = out / "settings.json"
    if saved.is_file() and {k: v for k, v in json.loads(saved.read_text()).items() if k != "argv"} != {
            k: v for k, v in settings.items() if k != "argv"}:
        raise SystemExit(f"{out} holds rows of other settings ({saved.read_text()}); use another --out")
    saved.write_text(json.dumps(settings))
    rows_path = out / "rows.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.is_file() else []
    done = {(r["method"], r["seed"]) for r in rows}
    experts, problem, test_problem, objectives = setup(args)
    for seed in range(args.seeds):
        for method in args.methods:
            if (method, seed) in done:
                continue
            row = run_one(method, seed, args, problem, test_problem, objectives)
            print(f"{method} seed {seed}: test HV {row['test_hv']:.4f} ({row['seconds']:.0f} s)", flush=True)
            with open(rows_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            rows.append(row)
    statics = {}
    for name in STATICS:
        merge = tune_static_merge(name, problem)
        statics[name] = objectives.values(test_problem, merge.score(test_problem).unsqueeze(0))[0].tolist()
    plot(rows, statics, out / "fronts.png")
    fronts = os.path.relpath(out / "fronts.png", report_path.parent)
    report_path.write_text(with_hand_written(report(rows, statics, settings, full, fronts), report_path,
                                             "benchmarks/pareto.py"))
    print(report_path.read_text())


if __name__ == "__main__":
    main()
