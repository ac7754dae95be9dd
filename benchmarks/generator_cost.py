"""What EvoGM's generators cost per generation, and how many evaluations they save.

For N = 8 and N = 20 experts, runs EvoGM with the authors' defaults (P = 20, 2 rounds x 3 iterations, two
128-256-256-256-128 MLPs, 200 Adam steps per generation) on the smooth synthetic landscape and reports:

* the wall time of generator training + generation per generated population (from `EvoGM.generator_log`);
* the best fitness after the 160-evaluation budget against uniform random search with the same budget, and the
  number of random-search evaluations needed to match EvoGM's result (the evaluations the generators save);
* the break-even evaluation cost: generator seconds per run / evaluations saved. Above it (any real merge
  evaluation: a forward pass of an LLM over a validation set) the generators pay for themselves.

Usage:
    python benchmarks/generator_cost.py [--seeds 5] [--out benchmarks/results/generator_cost.md]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from evox.workflows import StdWorkflow

from evox_merge.algorithms import EvoGM, RandomSearch
from evox_merge.problems.landscapes import SmoothLandscape

log = logging.getLogger("generator_cost")

RANDOM_SEARCH_CAP = 100_000  # evaluations


def run_evogm(num_experts: int, seed: int) -> tuple[EvoGM, float]:
    """One default EvoGM run on the seed's smooth landscape; returns the algorithm and its wall time in seconds."""
    landscape = SmoothLandscape(num_experts, seed=100 + seed)
    workflow = StdWorkflow(EvoGM(num_experts, seed=seed), landscape, opt_direction="max")
    start = time.perf_counter()
    workflow.init_step()
    for _ in range(workflow.algorithm.generations_per_run - 1):
        workflow.step()
    return workflow.algorithm, time.perf_counter() - start


def random_search(num_experts: int, seed: int, target: float, budget: int) -> tuple[float, int | None]:
    """Random search on the same landscape: its best score after `budget` evaluations, and the evaluations it takes
    to reach `target` (None if it does not within RANDOM_SEARCH_CAP)."""
    landscape = SmoothLandscape(num_experts, seed=100 + seed)
    workflow = StdWorkflow(RandomSearch(num_experts, seed=seed), landscape, opt_direction="max")
    algorithm = workflow.algorithm
    workflow.init_step()
    best_at_budget, reached_at, evaluations = None, None, algorithm.pop_size
    while evaluations <= RANDOM_SEARCH_CAP:
        best = -algorithm.best_fitness.item()
        if evaluations == budget:
            best_at_budget = best
        if reached_at is None and best >= target:
            reached_at = evaluations
        if reached_at is not None and best_at_budget is not None:
            break
        workflow.step()
        evaluations += algorithm.pop_size
    return best_at_budget, reached_at


def measure(num_experts: int, seeds: int) -> dict[str, object]:
    generator_seconds, run_seconds, shares, rows = [], [], [], []
    for seed in range(seeds):
        evogm, wall = run_evogm(num_experts, seed)
        per_generation = [entry["seconds"] for entry in evogm.generator_log]
        generator_seconds += per_generation
        run_seconds.append(wall)
        shares.append(sum(per_generation) / wall)
        best = -evogm.best_fitness.item()
        initial = -evogm.history.fitness[evogm.history.generation == 0].min().item()
        random_best, needed = random_search(num_experts, seed, best, evogm.evaluations_per_run)
        rows.append(
            {
                "seed": seed,
                "initial": initial,
                "evogm": best,
                "random": random_best,
                "needed": needed,
                "generator_s": sum(per_generation),
                "budget": evogm.evaluations_per_run,
            }
        )
        log.info(
            "N=%d seed %d: EvoGM %.3f (initial %.3f), random %.3f, random needs %s evaluations, generators %.1f s",
            num_experts, seed, best, initial, random_best, needed, sum(per_generation),
        )
    return {"generator_seconds": generator_seconds, "run_seconds": run_seconds, "shares": shares, "rows": rows}


def machine_description() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores, no GPU used; generators train on 1 thread by design",
        f"- Python {platform.python_version()}, torch {torch.__version__}, evox {importlib.metadata.version('evox')}",
        f"- {platform.platform()}",
    ]


def render(results: dict[int, dict[str, object]], seeds: int, load: tuple[float, float], elapsed: float) -> str:
    lines = [
        "# EvoGM generator cost per generation",
        "",
        "Generated by `python benchmarks/generator_cost.py --seeds %d` (%.0f s)." % (seeds, elapsed),
        "",
        "## Machine",
        *machine_description(),
        f"- load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f} (a shared machine: other jobs ran"
        " beside this one, so times are upper bounds for an idle machine)",
        "",
        "## Setup",
        "EvoGM with the authors' defaults: P = 20, 2 rounds x 3 iterations (160 evaluations, 8 generations, 6 of them"
        " generated), two 128-256-256-256-128 MLP generators, Adam lr 1e-4, 200 full-batch steps per generation,"
        " cycle weight 100. Landscape: `SmoothLandscape(N, seed=100 + seed)` (rotated ellipsoid, condition number 10,"
        " optimum in [-0.5, 0.5]^N off the simplex, maximum 0). Seeds 0..%d." % (seeds - 1),
        "",
        "## Generator time per generated population (training + generation, wall clock)",
        "",
        "| N | generations timed | median s | mean s | max s | share of the run's wall time on this landscape |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n, result in results.items():
        seconds = result["generator_seconds"]
        lines.append(
            f"| {n} | {len(seconds)} | {statistics.median(seconds):.2f} | {statistics.mean(seconds):.2f} | "
            f"{max(seconds):.2f} | {statistics.mean(result['shares']):.0%} |"
        )
    slowest = max(statistics.median(result["generator_seconds"]) for result in results.values())
    lines += [
        "",
        "On this landscape an evaluation costs microseconds, so the generators are nearly all of the run. In a real",
        "merge each generation also runs P = 20 evaluations of e seconds (a forward pass of the model over the",
        "validation set), so the generators' share of the run is g / (g + 20 e) for g seconds of generator time:",
        f"with g = {slowest:.2f} s (the larger median above) it is under 10% once e > {9 * slowest / 20:.2f} s and",
        f"under 1% once e > {99 * slowest / 20:.1f} s. The paper's \"negligible beside model inference\" (Table 7)",
        "holds for any model whose validation pass takes seconds.",
        "",
        "## What the generators buy: EvoGM vs uniform random search, same landscape and seed",
        "",
        "| N | seed | EvoGM initial best | EvoGM best (160 evals) | random best (160 evals) |"
        " random evals to match EvoGM | generator s per run | break-even s per evaluation |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, result in results.items():
        for row in result["rows"]:
            needed = row["needed"]
            saved = None if needed is None else needed - row["budget"]
            needed_text = f"> {RANDOM_SEARCH_CAP}" if needed is None else str(needed)
            if saved is None:
                break_even = f"< {row['generator_s'] / (RANDOM_SEARCH_CAP - row['budget']):.1e}"
            elif saved > 0:
                break_even = f"{row['generator_s'] / saved:.1e}"
            else:
                break_even = "never (random search was as good)"
            lines.append(
                f"| {n} | {row['seed']} | {row['initial']:.3f} | {row['evogm']:.3f} | {row['random']:.3f} | "
                f"{needed_text} | {row['generator_s']:.1f} | {break_even} |"
            )
        medians = [statistics.median(row[key] for row in result["rows"]) for key in ("initial", "evogm", "random")]
        lines.append(f"| {n} | median | {medians[0]:.3f} | {medians[1]:.3f} | {medians[2]:.3f} | | | |")
    lines += [
        "",
        "Fitness is the landscape's score (higher is better, 0 at the optimum). \"Break-even\" is the evaluation cost",
        "above which the generators' time is smaller than the time random search would spend on the extra",
        "evaluations it needs to reach EvoGM's result. That comparison credits EvoGM's initial population too (it",
        "holds the average merge): where the initial population alone beats random search, the gap between the",
        "initial and final EvoGM columns is what the generators add.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generator_cost.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    results = {n: measure(n, args.seeds) for n in (8, 20)}
    report = render(results, args.seeds, (load_start, os.getloadavg()[0]), time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
