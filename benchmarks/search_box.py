"""One search box for every algorithm, and searches started from the tuned static merges (issue 29, points 1-2).

Measured on the offline zoo's `tiny` preset, on the search and selection parts of validation only (test is never
read):

    python -m benchmarks.search_box box                 # boxes x algorithms x seeds, start: default
    python -m benchmarks.search_box start --box=-0.5,1.5  # start: static against default, in one box
    python -m benchmarks.search_box grid                # where the static merges' tuned scaling lands
    python -m benchmarks.search_box report              # benchmarks/results/search_box.md from the rows

Resumable: each finished run is appended to ``benchmarks/results/search_box/runs.jsonl`` (``grid.jsonl`` for the
grid part) and skipped when the command runs again. Runs are single-threaded, one at a time.

A run searches one single-task problem (the zoo's first three unseen tasks; their search parts: 32 examples per
task, as benchmarks/results/search_quality.md) with P = 20 and 8 generations, 160 evaluations (the library's
default budget), through the registry (`evox_merge.run.registry.build_algorithm`) and `evox_merge.run.loop.search`.
Its *pick* is its best candidate on the search part; the pick is *on the edge* when any coefficient lies within
1e-5 of lb or ub. The selection part scores the pick.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from evox_merge.algorithms import limits
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.normalisation import anchor_normalisation
from evox_merge.problems.static_merges import DEFAULT_SCALINGS, STATIC_MERGES, dense_merge, task_arithmetic
from evox_merge.run.loop import search
from evox_merge.run.registry import build_algorithm, start_points
from evox_merge.run.selection import static_candidates
from evox_merge.tasks import read_task, split_task
from evox_merge.util.machine import machine_markdown

OUT = Path("benchmarks/results/search_box")
REPORT = Path("benchmarks/results/search_box.md")
BOXES = [(-1.0, 1.0), (-1.0, 2.0), (-2.0, 2.0), (-1.5, 3.0), (-1.0, 1.5), (-0.5, 1.5)]
ALGORITHMS = ["evogm", "cmaes", "pso", "random"]
BOX_SEEDS = [0, 1, 2]
START_SEEDS = [0, 1, 2, 3, 4, 5]
NUM_TASKS = 3
POP, GENERATIONS = 20, 8
SELECTION_FRACTION, MAX_VALIDATION = 0.3, 32
EDGE_TOLERANCE = 1e-5
OLD_SCALINGS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
GRID_POINTS = (*OLD_SCALINGS, 1.25, 1.5, 1.75, 2.0)
GRIDS = {"old (0.1..1.0)": OLD_SCALINGS, "to 1.5": GRID_POINTS[:12], "to 2.0": GRID_POINTS}
GRID_METHODS = {"task_arithmetic": None, "ties": ("ties", 0.2), "dare": ("dare_ties", 0.5)}


@lru_cache(maxsize=1)
def _zoo():
    from evox_merge.experts import ExpertSet
    from evox_merge.run.zoo_search import zoo_paths

    base, adapters, seen, unseen = zoo_paths("tiny", 0)
    return ExpertSet.load(base, adapters), seen, unseen


def _tasks() -> list[str]:
    return [spec.name for spec in _zoo()[2][:NUM_TASKS]]


@lru_cache(maxsize=16)
def _problems(names: tuple[str, ...]) -> tuple[MergeProblem, MergeProblem]:
    """Search and selection parts of a task group, normalised on the search part (0 = base, 1 = best single)."""
    experts, seen, unseen = _zoo()
    specs = {spec.name: spec for spec in [*seen, *unseen]}
    parts = [split_task(read_task(specs[name]), SELECTION_FRACTION, MAX_VALIDATION) for name in names]
    search_problem = MergeProblem(experts, [s for s, _ in parts], batch_size=128)
    selection = MergeProblem(experts, [s for _, s in parts], batch_size=128)
    normalisation = anchor_normalisation(search_problem)
    return search_problem.normalise(normalisation), selection.normalise(normalisation)


@lru_cache(maxsize=8)
def _statics(task: str) -> tuple[torch.Tensor | None, list[str], float]:
    """The starting points of ``start: static`` for a task (as `evox_merge.run.search` makes them: every static merge
    tuned on the search part, the linear ones best first) and the best of them's search-part fitness."""
    problem, _ = _problems((task,))
    statics = static_candidates(problem, list(STATIC_MERGES), seed=0)
    initial, names = start_points(statics)
    fitness = {c.name: c.search_fitness for c in statics}
    return initial, names, max(fitness[name] for name in names)


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _key(row: dict[str, Any]) -> tuple:
    return row["task"], row["algorithm"], row["lb"], row["ub"], row["start"], row["seed"]


def run_one(task: str, algorithm: str, lb: float, ub: float, start: str, seed: int) -> dict[str, Any]:
    """One search; its row (search-part best, its selection-part fitness, whether it is on the box's edge)."""
    started = time.perf_counter()
    problem, selection = _problems((task,))
    initial = _statics(task)[0] if start == "static" else None
    built = build_algorithm(algorithm, problem.num_experts, pop_size=POP, lb=lb, ub=ub, seed=seed, initial=initial)
    torch.manual_seed(seed)
    records = search(built, problem, GENERATIONS).records
    scored = [r for r in records if r["fitness"] is not None]
    best = max(scored, key=lambda r: r["fitness"])
    coefficients = torch.tensor(best["coefficients"])
    chosen = float(selection.aggregate(selection.evaluate_linear(coefficients[None]))[0])
    everything = torch.tensor([r["coefficients"] for r in records])
    row = {"task": task, "algorithm": algorithm, "lb": lb, "ub": ub, "start": start, "seed": seed,
           "evaluations": len(records), "search": best["fitness"], "selection": chosen,
           "edge_low": bool((coefficients <= lb + EDGE_TOLERANCE).any()),
           "edge_high": bool((coefficients >= ub - EDGE_TOLERANCE).any()),
           "coefficients": best["coefficients"], "max_abs": float(coefficients.abs().max()),
           "all_in_box": bool(((everything >= lb) & (everything <= ub)).all()),
           "seconds": time.perf_counter() - started}
    row["edge"] = row["edge_low"] or row["edge_high"]
    if start == "static":
        first = everything[:POP]
        row["starts_fitness"] = _statics(task)[2]
        row["starts_in_first_generation"] = all(
            bool((first == torch.clamp(point, lb, ub)).all(-1).any()) for point in initial)
    return row


def _run(todo: list[tuple], path: Path) -> None:
    done = {_key(row) for row in _read(path)}
    todo = [cell for cell in todo if cell not in done]
    print(f"{len(todo)} runs to do ({len(done)} done)", flush=True)
    torch.set_num_threads(1)
    for i, cell in enumerate(todo):
        row = run_one(*cell)
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"[{i + 1}/{len(todo)}] {cell}: search {row['search']:.4f} selection {row['selection']:.4f} "
              f"edge {row['edge']} ({row['seconds']:.1f} s)", flush=True)


def box_cells() -> list[tuple]:
    """Every box x algorithm x task x seed with start: default."""
    return [(task, algorithm, lb, ub, "default", seed) for lb, ub in BOXES for algorithm in ALGORITHMS
            for seed in BOX_SEEDS for task in _tasks()]


def start_cells(lb: float, ub: float) -> list[tuple]:
    """Every algorithm x task x seed with start static and default, in the box [lb, ub]."""
    return [(task, algorithm, lb, ub, start, seed) for algorithm in ALGORITHMS for seed in START_SEEDS
            for start in ("static", "default") for task in _tasks()]


def grid_rows(path: Path) -> None:
    """The search-part fitness of task arithmetic, TIES and DARE at every scaling of `GRID_POINTS` (each scored
    through the library's own tuning function with a one-point grid), on every setting of the tiny zoo (single-task
    unseen: each unseen task); the report derives each grid's choice (the first best point, as the tuning does)."""
    experts, seen, unseen = _zoo()
    groups = [("single_task_unseen", (spec.name,)) for spec in unseen]
    groups += [("multi_task_unseen", tuple(s.name for s in unseen)), ("multi_task_seen", tuple(s.name for s in seen))]
    done = {(r["setting"], tuple(r["tasks"]), r["method"]) for r in _read(path)}
    torch.set_num_threads(1)
    for setting, names in groups:
        problem, _ = _problems(names)
        for method, operator in GRID_METHODS.items():
            if (setting, names, method) in done:
                continue
            fitness = [(task_arithmetic(problem, (s,)) if operator is None else dense_merge(
                problem, operator[0], density=operator[1], scalings=(s,), seed=0)).fitness for s in GRID_POINTS]
            row = {"setting": setting, "tasks": list(names), "method": method, "scalings": list(GRID_POINTS),
                   "search": fitness}
            with open(path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(setting, names, method, [round(f, 3) for f in fitness], flush=True)


def grid_choice(row: dict, grid: tuple[float, ...]) -> float:
    """The scaling the tuning picks from `grid` (the first best, as `_best_of` and `dense_merge` do)."""
    points = [(f, s) for s, f in zip(row["scalings"], row["search"]) if s in grid]
    best = max(f for f, _ in points)
    return next(s for f, s in points if f == best)


# --- report -------------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _seed_means(rows: list[dict], field: str) -> list[float]:
    """Per seed, the mean over tasks (the unit of the t-tests)."""
    seeds = sorted({r["seed"] for r in rows})
    return [_mean([r[field] for r in rows if r["seed"] == seed]) for seed in seeds]


def _welch(a: list[float], b: list[float]) -> str:
    try:
        from scipy.stats import ttest_ind
    except ImportError:
        return "n/a (scipy missing)"
    if len(a) < 2 or len(b) < 2:
        return "n/a"
    p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return "1" if math.isnan(p) else f"{p:.3g}"


def _box_name(lb: float, ub: float) -> str:
    return f"[{lb:g}, {ub:g}]"


def choose_box(rows: list[dict]) -> tuple[tuple[float, float] | None, str]:
    """The rule (issue 29's target: no algorithm's pick on the edge in more than a third of runs): among the boxes
    whose picks are on the edge in at most a third of runs for every algorithm, and where no algorithm's search-part
    fitness is below its [-1, 1] fitness with Welch p < 0.05 (per-seed means), the one with the highest search-part
    fitness averaged over the algorithms; None when no box qualifies."""
    def runs(box, algorithm):
        return [r for r in rows
                if (r["lb"], r["ub"]) == box and r["start"] == "default" and r["algorithm"] == algorithm]

    def lower(box, algorithm) -> bool:
        ours, base = _seed_means(runs(box, algorithm), "search"), _seed_means(runs(BOXES[0], algorithm), "search")
        p = _welch(ours, base)
        return _mean(ours) < _mean(base) and p.replace(".", "", 1).replace("e-", "", 1).isdigit() and float(p) < 0.05

    def fitness(box) -> float:
        return _mean([_mean([r["search"] for r in runs(box, a)]) for a in ALGORITHMS])

    eligible = [box for box in BOXES if all(runs(box, a) for a in ALGORITHMS)
                and all(_mean([float(r["edge"]) for r in runs(box, a)]) <= 1 / 3 + 1e-9 for a in ALGORITHMS)
                and not any(lower(box, a) for a in ALGORITHMS)]
    if not eligible:
        return None, "no box keeps every algorithm's edge hits at or under a third of runs without a lower fitness"
    box = max(eligible, key=fitness)
    return box, (f"eligible: {', '.join(f'{_box_name(*b)} (mean search fitness {fitness(b):.4f})' for b in eligible)}"
                 f"; [-1, 1]: {fitness(BOXES[0]):.4f}")


def write_report() -> Path:
    """benchmarks/results/search_box.md from the rows (the notes around the tables are in `NOTES`)."""
    runs, grid = _read(OUT / "runs.jsonl"), _read(OUT / "grid.jsonl")
    lines = [NOTES_HEAD.format(tasks=", ".join(_tasks()), machine=machine_markdown()), ""]
    lines += ["## The box: edge hits and fitness (start: default)", "",
              "Per box and algorithm, over tasks x seeds: the share of runs whose pick (best candidate on the search "
              "part) has a coefficient on the box's edge (low / high edge counts), the mean search-part fitness of "
              "the pick (mean +- std over the per-seed means), its mean selection-part fitness, the largest |c| of "
              "a pick, and whether every evaluated candidate lay in the box. p: Welch's t-test of the per-seed "
              "search-part means against [-1, 1].", "",
              "| box | algorithm | runs | on edge | low / high | search (mean +- std) | p vs [-1, 1] | selection "
              "| max abs c | all in box |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for box in BOXES:
        for algorithm in ALGORITHMS:
            sub = [r for r in runs if (r["lb"], r["ub"]) == box and r["algorithm"] == algorithm
                   and r["start"] == "default" and r["seed"] in BOX_SEEDS]
            if not sub:
                continue
            base = [r for r in runs if (r["lb"], r["ub"]) == BOXES[0] and r["algorithm"] == algorithm
                    and r["start"] == "default" and r["seed"] in BOX_SEEDS]
            means = _seed_means(sub, "search")
            p = "" if box == BOXES[0] else _welch(means, _seed_means(base, "search"))
            lines.append(
                f"| {_box_name(*box)} | {algorithm} | {len(sub)} | {_mean([float(r['edge']) for r in sub]):.2f} | "
                f"{sum(r['edge_low'] for r in sub)} / {sum(r['edge_high'] for r in sub)} | "
                f"{_mean(means):.4f} +- {statistics.pstdev(means) if len(means) > 1 else 0:.4f} | {p} | "
                f"{_mean([r['selection'] for r in sub]):.4f} | {max(r['max_abs'] for r in sub):.2f} | "
                f"{all(r['all_in_box'] for r in sub)} |")
    box_rows = [r for r in runs if r["seed"] in BOX_SEEDS and r["start"] == "default"]
    chosen, why = choose_box(box_rows)
    lines += ["", f"**Rule's choice**: {_box_name(*chosen) if chosen else 'none'} ({why}). "
              f"The library's default box: {_box_name(limits.DEFAULT_LB, limits.DEFAULT_UB)}.", ""]
    lines += _start_table(runs)
    lines += _grid_table(grid)
    kept = REPORT.read_text().partition(MARKER)[2] if REPORT.exists() else ""
    REPORT.write_text("\n".join(lines) + "\n" + MARKER + (kept or "\n"))
    return REPORT


def _start_table(runs: list[dict]) -> list[str]:
    static = [r for r in runs if r["start"] == "static"]
    if not static:
        return []
    box = (static[0]["lb"], static[0]["ub"])
    lines = [f"## Start: static against default, box {_box_name(*box)}", "",
             "Per algorithm, over tasks x seeds (t-tests over the per-seed means across tasks): search-part and "
             "selection-part fitness of the pick; how many runs' best stayed below the best static starting point "
             "on the search part; whether the static start evaluated every starting point in its first generation.",
             "", "| algorithm | start | runs | search (mean +- std) | p (search) | selection (mean +- std) | "
             "p (selection) | below best start | starts in gen 1 |", "| --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- |"]
    for algorithm in ALGORITHMS:
        groups = {start: [r for r in runs if (r["lb"], r["ub"]) == box and r["algorithm"] == algorithm
                          and r["start"] == start and r["seed"] in START_SEEDS] for start in ("static", "default")}
        starts = {r["task"]: r["starts_fitness"] for r in groups["static"]}
        for start, sub in groups.items():
            if not sub:
                continue
            other = groups["default" if start == "static" else "static"]
            search, selection = _seed_means(sub, "search"), _seed_means(sub, "selection")
            below = sum(r["search"] < starts.get(r["task"], -math.inf) - 1e-9 for r in sub)
            first = all(r.get("starts_in_first_generation", True) for r in sub) if start == "static" else ""
            lines.append(
                f"| {algorithm} | {start} | {len(sub)} | {_mean(search):.4f} +- {statistics.pstdev(search):.4f} | "
                f"{_welch(search, _seed_means(other, 'search')) if start == 'static' else ''} | "
                f"{_mean(selection):.4f} +- {statistics.pstdev(selection):.4f} | "
                f"{_welch(selection, _seed_means(other, 'selection')) if start == 'static' else ''} | "
                f"{below} of {len(sub)} | {first} |")
    everyone = {s: _seed_means([r for r in runs if (r["lb"], r["ub"]) == box and r["start"] == s
                                and r["seed"] in START_SEEDS], f) for s in ("static", "default")
                for f in ("search",)}
    chosen = {s: _seed_means([r for r in runs if (r["lb"], r["ub"]) == box and r["start"] == s
                              and r["seed"] in START_SEEDS], "selection") for s in ("static", "default")}
    lines += ["", f"All algorithms pooled (per-seed means over algorithms and tasks): search part static "
              f"{_mean(everyone['static']):.4f}, default {_mean(everyone['default']):.4f}, p "
              f"{_welch(everyone['static'], everyone['default'])}; selection part static "
              f"{_mean(chosen['static']):.4f}, default {_mean(chosen['default']):.4f}, p "
              f"{_welch(chosen['static'], chosen['default'])}.", ""]
    return lines


def _grid_table(grid: list[dict]) -> list[str]:
    if not grid:
        return []
    lines = ["## Static merges' scaling grid", "",
             f"The default grid is {list(DEFAULT_SCALINGS)} ({len(DEFAULT_SCALINGS)} points, "
             f"{len(DEFAULT_SCALINGS) - len(OLD_SCALINGS):+d} evaluations per tuned method against the old grid's "
             f"{len(OLD_SCALINGS)}; three methods are tuned: task arithmetic, TIES, DARE). Per setting and method, "
             "over its task groups: how many choices lie on the grid's edge (its lowest or highest point; in "
             "brackets the highest), for each grid; and the choices with the grid to 2.0. Search part only; DARE's "
             "drop masks from seed 0.", "",
             "| setting | method | groups | " + " | ".join(f"{name}: on edge (top)" for name in GRIDS)
             + " | chosen, grid to 2.0 |", "| --- | --- | --- | " + " | ".join("---" for _ in GRIDS) + " | --- |"]
    for setting in ("single_task_unseen", "multi_task_unseen", "multi_task_seen"):
        for method in GRID_METHODS:
            rows = [r for r in grid if r["setting"] == setting and r["method"] == method]
            if not rows:
                continue
            cells = []
            for points in GRIDS.values():
                chosen = [grid_choice(r, points) for r in rows]
                cells.append(f"{sum(c in (min(points), max(points)) for c in chosen)} "
                             f"({sum(c == max(points) for c in chosen)})")
            wide = ", ".join(format(grid_choice(r, GRID_POINTS), "g") for r in rows)
            lines.append(f"| {setting} | {method} | {len(rows)} | " + " | ".join(cells) + f" | {wide} |")
    return lines + [""]


NOTES_HEAD = """# One search box, and searches that start from the static merges (issue 29, points 1 and 2)

Written by `python -m benchmarks.search_box report` from `search_box/runs.jsonl` and `search_box/grid.jsonl`
(reproduce: `python -m benchmarks.search_box box`, then `start --box=LB,UB`, then `grid`; each resumes).

**Settings.** Offline zoo, `tiny` preset (8 LoRA experts of a 4M-parameter Qwen2). Single-task problems on the
zoo's first three unseen tasks ({tasks}); each validation file (100 examples) split into a selection part (30%) and a
search part (32 examples used), fitness the normalised mean (0 = base, 1 = best single expert), as in
search_quality.md. Every search: P = 20, 8 generations = 160 evaluations (EvoGM: 2 rounds x 3 iterations), built by
the registry, run by `evox_merge.run.loop.search`. Only the search and selection parts are read: nothing here
touches test. The *pick* is the best candidate on the search part; *on edge*: a coefficient within 1e-5 of lb or
ub.

**Machine** (2 CPU cores shared with other jobs; quality only, no timings):
{machine}"""

MARKER = "<!-- Written by hand below this line; `python -m benchmarks.search_box report` keeps it. -->"


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["box", "start", "grid", "report"])
    parser.add_argument("--box", default=f"{limits.DEFAULT_LB},{limits.DEFAULT_UB}",
                        help="LB,UB for the start part (default: the library's default box)")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.part == "box":
        _run(box_cells(), OUT / "runs.jsonl")
    elif args.part == "start":
        lb, ub = (float(x) for x in args.box.split(","))
        _run(start_cells(lb, ub), OUT / "runs.jsonl")
    elif args.part == "grid":
        grid_rows(OUT / "grid.jsonl")
    print(f"report: {write_report()}")


if __name__ == "__main__":
    main()
