"""EvoGM then CMA-ES (`evogm_cmaes`) against CMA-ES and EvoGM (default) at 64, 128 and 256 evaluations (issue 29,
point 3), every search started from the static merges tuned on its search part (``start: static``, the product's).

    python -m benchmarks.evogm_hybrid run [--seeds 0 1 2 3] [--settings single_task_unseen multi_task_unseen]
        [--methods evogm_cmaes cmaes evogm] [--workers 2]      # resumable: finished cells are skipped
    python -m benchmarks.evogm_hybrid report                  # tables from runs.jsonl, into evogm_hybrid.md

One cell is one method, task group and seed, run for the largest budget (256 evaluations, P = 2N = 16, 16
generations); the results at 64 and 128 evaluations are the run's first 64 and 128 records, picked and scored as a
run of that budget would be. That is exact for every method here: CMA-ES and `evogm_cmaes` do not depend on the
budget (the hybrid switches after a fixed number of generations), and EvoGM with R = 4 rounds of T = 3 iterations
runs its first 4 (8) generations exactly as EvoGM with R = 1 (2) rounds, the sweep's budgets of 64 (128)
evaluations. The protocol is search_quality.md's (tiny zoo, 32 search examples per task, a selection part of 30%,
the pick the best of the 5 best candidates on the selection part, normalised fitness); test is scored only on the
picks. Pilot methods (``evogm_cmaes_k1`` ... ) vary the hybrid's knob; compare them on search/selection only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from benchmarks.sweep.cells import _cached_setup, _problems, static_start
from benchmarks.sweep.config import SweepConfig
from benchmarks.sweep.setup import load_setup
from evox_merge.run.loop import search
from evox_merge.run.registry import build_algorithm
from evox_merge.run.selection import searched_candidates, select_release, static_candidates
from evox_merge.util.machine import host_description

ROOT = Path("benchmarks/results/evogm_hybrid")
BUDGETS = (64, 128, 256)
POP_PER_EXPERT = 2
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "evogm_cmaes": ("evogm_cmaes", {}),
    "cmaes": ("cmaes", {}),
    "evogm": ("evogm", {"num_rounds": 4, "iterations_per_round": 3}),
    **{f"evogm_cmaes_k{k}": ("evogm_cmaes", {"generative_generations": k}) for k in (1, 2, 4)},
}
CONFIG = SweepConfig.model_validate({
    "setup": {"zoo_preset": "tiny", "zoo_seed": 0}, "max_validation_examples": 32, "selection_fraction": 0.3,
    "selection_top_k": 5, "normalise": "base_best_single", "batch_size": 128, "start": "static",
    "output_dir": str(ROOT)})
PRODUCT_STATICS = ("task_arithmetic", "ties", "model_soup", "best_single")


def cells(settings: list[str], methods: list[str], seeds: list[int], tasks: list[str] | None) -> list[dict]:
    """Every (setting, task group, method, seed) of the grid."""
    setup = load_setup(CONFIG.setup)
    groups = {"single_task_unseen": [(name,) for name in (tasks or setup.unseen)],
              "multi_task_unseen": [tuple(setup.unseen)], "multi_task_seen": [tuple(setup.seen)]}
    return [{"setting": setting, "tasks": list(group), "method": method, "seed": seed}
            for setting in settings for group in groups[setting] for seed in seeds for method in methods]


def key(cell: dict) -> str:
    """A cell's id in runs.jsonl."""
    return f"{cell['setting']}|{'+'.join(cell['tasks'])}|{cell['method']}|{cell['seed']}"


def run_group(cells: list[dict]) -> list[list[dict]]:
    """`run_cell` for cells of one task group and seed, on one set of problems: the static merges are tuned once
    (`static_start` is deterministic given the search part and the seed, and every method here takes starting
    points), then each method searches from them."""
    torch.set_num_threads(1)
    setup = _cached_setup(CONFIG.setup.model_dump_json())
    problems = _problems(setup, CONFIG, tuple(cells[0]["tasks"]), cells[0]["seed"])
    initial, starts, statics = static_start(METHODS[cells[0]["method"]][0], CONFIG.start, problems[0],
                                            cells[0]["seed"])
    tuned = {c.name for c in statics}  # the linear ones; the product's other rivals (TIES) are tuned here
    statics = statics + static_candidates(problems[0], [n for n in PRODUCT_STATICS if n not in tuned],
                                          seed=cells[0]["seed"])
    return [run_cell(cell, problems, (initial, starts, statics)) for cell in cells]


def run_cell(cell: dict, problems: tuple, start: tuple) -> list[dict]:
    """One run of the largest budget; one row per budget (its prefix), each with its pick's scores. `problems`:
    search, selection and test parts of the cell's tasks; `start`: `static_start`'s answer for them."""
    setup = _cached_setup(CONFIG.setup.model_dump_json())
    problem, selection, test = problems
    name, params = METHODS[cell["method"]]
    initial, starts, statics = start
    torch.manual_seed(cell["seed"])
    pop_size = POP_PER_EXPERT * setup.experts.num_experts
    algorithm = build_algorithm(name, problem.dim, pop_size=pop_size, seed=cell["seed"], params=params,
                                initial=initial)
    monitor = search(algorithm, problem, max(BUDGETS) // pop_size)
    records, curve = monitor.records, monitor.best_so_far()
    products = [c for c in statics if c.name in PRODUCT_STATICS]
    select_release(products, selection)
    rows = []
    for budget in BUDGETS:
        candidate = select_release(searched_candidates(records[:budget], CONFIG.selection_top_k), selection)
        product = select_release([candidate, *products], selection)
        scores = candidate.merge.score(test)
        product_scores = scores if product is candidate else product.merge.score(test)
        rows.append({**cell, "budget": budget, "validation": curve[budget - 1], "selection": candidate.selection_fitness,
                     "test": float(scores.double() @ test.task_weights),
                     "test_normalised": float(test.aggregate(scores.unsqueeze(0))[0]),
                     "product_pick": product.name, "product_selection": product.selection_fitness,
                     "product_test": float(product_scores.double() @ test.task_weights),
                     "coefficients": candidate.merge.coefficients.tolist(), "start": "static",
                     "starting_points": starts, "curve": curve[:budget] if budget == max(BUDGETS) else None,
                     "switch": getattr(algorithm, "switch", None),
                     "generative_generations": getattr(algorithm, "generative_generations", None), "host": host_description()})
    return rows


def run(args: argparse.Namespace) -> None:
    """Run the cells not in runs.jsonl yet, appending each cell's rows as it finishes."""
    ROOT.mkdir(parents=True, exist_ok=True)
    path = ROOT / "runs.jsonl"
    done = {key(row) for row in map(json.loads, path.read_text().splitlines())} if path.exists() else set()
    todo = [c for c in cells(args.settings, args.methods, args.seeds, args.tasks) if key(c) not in done]
    groups: dict[str, list[dict]] = {}
    for cell in todo:
        groups.setdefault(f"{cell['setting']}|{'+'.join(cell['tasks'])}|{cell['seed']}", []).append(cell)
    jobs = sorted(groups.values(), key=lambda group: -len(group[0]["tasks"]))
    print(f"{len(todo)} cells to run in {len(jobs)} groups ({len(done)} done)", flush=True)

    def write(rows: list[dict]) -> None:
        with open(path, "ab", buffering=0) as handle:  # one write: several invocations may append at once
            handle.write("".join(json.dumps(row) + "\n" for row in rows).encode())
        print(f"done {key(rows[0])}: " + ", ".join(f"{r['budget']}: {r['validation']:.3f}" for r in rows), flush=True)

    if args.workers == 1:
        for group in jobs:
            for rows in run_group(group):
                write(rows)
        return
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(run_group, group) for group in jobs]):
            for rows in future.result():
                write(rows)


def landscapes(seeds: int) -> None:
    """The synthetic check: `evogm_cmaes`, CMA-ES and EvoGM (default) on benchmarks/landscapes.py's `smooth` and
    `corners` landscapes (its N = 8, P = 16, 128 evaluations, its `run_one`), into landscapes.jsonl (resumable)."""
    from benchmarks import landscapes as bench
    from evox_merge.algorithms.evogm_hybrid import EvoGMHybrid

    bench.METHODS["evogm_cmaes"] = lambda seed: EvoGMHybrid(bench.N, pop_size=bench.P, seed=seed)
    ROOT.mkdir(parents=True, exist_ok=True)
    path = ROOT / "landscapes.jsonl"
    done = {(r["method"], r["landscape"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())} if (
        path.exists()) else set()
    for name in ("smooth", "corners"):
        for seed in range(seeds):
            for method in ("evogm_cmaes", "cmaes", "evogm_default"):
                if (method, name, seed) not in done:
                    row = {"method": method, "landscape": name, "seed": seed, **bench.run_one(method, name, seed)}
                    with open(path, "a") as handle:
                        handle.write(json.dumps(row) + "\n")


def main() -> None:
    """`run` or `report`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "report", "landscapes"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--settings", nargs="+", default=["single_task_unseen", "multi_task_unseen"])
    parser.add_argument("--methods", nargs="+", default=["evogm_cmaes", "cmaes", "evogm"], choices=list(METHODS))
    parser.add_argument("--tasks", nargs="+", default=None, help="single-task tasks (default: every unseen task)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    elif args.command == "landscapes":
        landscapes(6)
    else:
        from benchmarks.evogm_hybrid_report import write_report
        write_report(ROOT / "runs.jsonl", Path("benchmarks/results/evogm_hybrid.md"))


if __name__ == "__main__":
    main()
