"""EvoGM (paper and default variants, and one ablation per switch) against random search, CMA-ES and PSO on the
synthetic landscapes, at an equal budget of evaluations.

N = 8 experts, P = 16, 128 evaluations (EvoGM: 2 rounds x 3 iterations; every method 8 generations of 16), on five
landscapes of evox_merge/problems/landscapes.py, several seeds each. Per run it records the best fitness (for the
noisy landscape: the noise-free value of the candidate the method saw as best), the candidates' spread per
generation (mean L2 distance to the generation's centroid, original basis), exact repeats and near-duplicates
(within 0.05 L2 of an earlier candidate of the run), EvoGM's basis condition numbers and generator seconds.

Runs are appended to a JSONL file as they finish, so an interrupted benchmark resumes where it stopped.

Usage:
    python -m benchmarks.landscapes [--seeds 6] [--methods a,b] [--landscapes a,b] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from evox.core import Problem
from evox.workflows import StdWorkflow

from evox_merge.algorithms import BoundedCMAES, BoundedPSO, EvoGM, RandomSearch
from evox_merge.problems.landscapes import (
    NoisyLandscape,
    RuggedLandscape,
    SmoothLandscape,
    TaskVectorLandscape,
    default_optimum,
)
from evox_merge.util.machine import machine_markdown

log = logging.getLogger("benchmarks.landscapes")

N, P, ROUNDS, ITERATIONS = 8, 16, 2, 3
GENERATIONS = ROUNDS * (ITERATIONS + 1)  # 8 generations of 16: 128 evaluations
NEAR = 0.05  # L2 distance under which a candidate counts as a near-duplicate of an earlier one


def landscape(name: str, seed: int) -> tuple[Problem, Problem, float]:
    """The landscape for a seed: (problem the search sees, noise-free truth, truth's maximum)."""
    if name == "smooth":
        problem = SmoothLandscape(N, seed=100 + seed)
        return problem, problem, 0.0
    if name == "corners":
        optimum = default_optimum(N, torch.Generator().manual_seed(200 + seed), radius=0.9)
        problem = SmoothLandscape(N, seed=100 + seed, optimum=optimum)
        return problem, problem, 0.0
    if name == "noisy":
        truth = SmoothLandscape(N, seed=100 + seed)
        return NoisyLandscape(truth, noise_std=0.05, seed=seed), truth, 0.0
    if name == "rugged":
        problem = RuggedLandscape(N, seed=100 + seed)
        return problem, problem, 0.0
    if name == "task_vectors":
        problem = TaskVectorLandscape(N, seed=100 + seed)
        return problem, problem, float(problem.evaluate(problem.optimum[None])[0])
    raise ValueError(name)


LANDSCAPES = ["smooth", "corners", "noisy", "rugged", "task_vectors"]

# Ablations: the default variant minus one switch.
ABLATIONS = {
    "extrapolation": {"extrapolation": 0.0},
    "mutation": {"mutation": False},
    "archive": {"archive": False},
    "task_arithmetic_scales": {"task_arithmetic_scales": ()},
    "newer_ties": {"newer_ties": False},
    "guarded_shift": {"guarded_shift": False},
}


def evogm(**switches) -> Callable[[int], EvoGM]:
    return lambda seed: EvoGM(N, pop_size=P, num_rounds=ROUNDS, iterations_per_round=ITERATIONS, seed=seed, **switches)


METHODS: dict[str, Callable[[int], object]] = {
    "random": lambda seed: RandomSearch(N, pop_size=P, seed=seed),
    "cmaes": lambda seed: BoundedCMAES(N, pop_size=P, seed=seed),
    "pso": lambda seed: BoundedPSO(N, pop_size=P, seed=seed),
    "evogm_paper": evogm(variant="paper"),
    "evogm_default": evogm(variant="default"),
    **{f"default-{name}": evogm(variant="default", **change) for name, change in ABLATIONS.items()},
}


class Recording(Problem):
    """Evaluates a landscape and keeps every population it received with the fitness it returned."""

    def __init__(self, base: Problem):
        super().__init__()
        self.base = base
        self.populations: list[torch.Tensor] = []
        self.fitness: list[torch.Tensor] = []

    def evaluate(self, pop: torch.Tensor) -> torch.Tensor:
        fitness = self.base.evaluate(pop)
        self.populations.append(pop.detach().clone())
        self.fitness.append(fitness.detach().clone())
        return fitness


def run_one(method: str, landscape_name: str, seed: int) -> dict[str, object]:
    """One run: best (noise-free) fitness, regret, spread per generation, repeats, conditions, seconds."""
    problem, truth, maximum = landscape(landscape_name, seed)
    recording = Recording(problem)
    algorithm = METHODS[method](seed)
    workflow = StdWorkflow(algorithm, recording, opt_direction="max")
    start = time.perf_counter()
    workflow.init_step()
    for _ in range(GENERATIONS - 1):
        workflow.step()
    seconds = time.perf_counter() - start
    candidates = torch.cat(recording.populations)
    observed = torch.cat(recording.fitness)
    assert len(candidates) == N * 0 + P * GENERATIONS, "every method evaluates exactly P per generation"
    observed = torch.where(torch.isfinite(observed), observed, -torch.inf)
    best = candidates[int(torch.argmax(observed))]
    best_true = float(truth.evaluate(best[None])[0])
    spread = [float((pop - pop.mean(0)).norm(dim=1).mean()) for pop in recording.populations]
    distances = torch.cdist(candidates.double(), candidates.double())
    earlier = torch.tril(torch.ones_like(distances, dtype=torch.bool), diagonal=-1)
    exact = int(((distances == 0) & earlier).any(1).sum())
    near = int(((distances <= NEAR) & earlier).any(1).sum())
    result: dict[str, object] = {
        "method": method,
        "landscape": landscape_name,
        "seed": seed,
        "best": best_true,
        "regret": maximum - best_true,
        "best_norm": float(best.norm()),
        "spread": spread,
        "exact_repeats": exact,
        "near_duplicates": near,
        "seconds": seconds,
    }
    inner = workflow.algorithm
    if isinstance(inner, EvoGM):
        result["conditions"] = [float(torch.linalg.cond(basis.double())) for basis in inner.bases[1:]]
        result["generator_seconds"] = sum(entry["seconds"] for entry in inner.generator_log)
        result["skipped_shifts"] = list(inner.skipped_shifts)
    return result


def _fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.2e}"


def report(rows: list[dict], seeds: int, command: str, wall: float) -> str:
    """The results file: machine, command, settings, tables, targets."""
    by = {}
    for row in rows:
        by.setdefault((row["method"], row["landscape"]), []).append(row)
    methods = [m for m in METHODS if any(k[0] == m for k in by)]
    landscapes = [name for name in LANDSCAPES if any(k[1] == name for k in by)]
    lines = [
        "# Search algorithms on the synthetic landscapes",
        "",
        f"Generated by `{command}` ({sum(r['seconds'] for r in rows) / 60:.1f} min of run time summed over the "
        f"{len(rows)} runs, {wall / 60:.1f} min in the last sitting; runs resume from landscapes_runs.jsonl). The "
        "machine is shared: other jobs ran beside this one, so seconds are upper bounds.",
        "",
        "## Machine",
        machine_markdown(),
        "",
        "## Settings",
        f"N = {N} experts, P = {P}, {P * GENERATIONS} evaluations per run ({GENERATIONS} generations; EvoGM "
        f"{ROUNDS} rounds x {ITERATIONS} iterations, authors' generator settings: 128-256-256-256-128 MLPs, "
        f"200 Adam steps at lr 1e-4 per generation, cycle weight 100). Seeds 0..{seeds - 1}; seed s uses landscape "
        "seed 100 + s and algorithm seed s. Box [-1, 1]^N for every method. Landscapes: `smooth` "
        "(SmoothLandscape, rotated ellipsoid, condition 10, optimum in [-0.5, 0.5]^N), `corners` (the same with "
        "`default_optimum(N, rng, radius=0.9)`), `noisy` (smooth + Gaussian noise 0.05 per evaluation; the table "
        "shows the noise-free value of the candidate the method saw as best), `rugged` (shifted Rastrigin, A = 0.1, "
        "k = 2), `task_vectors` (TaskVectorLandscape, D = 256; best fitness includes the unreachable residual, "
        "regret subtracts it). Fitness is higher-is-better, maximum 0 (regret = maximum - best).",
        "",
        "`default-X` is the default variant with switch X turned off (an ablation row per switch).",
        "",
    ]
    for stat_name, stat in (("Median", statistics.median), ("Mean", statistics.mean)):
        lines += [f"## {stat_name} best fitness ({seeds} seeds)", ""]
        lines += ["| method | " + " | ".join(landscapes) + " |", "| --- |" + " --- |" * len(landscapes)]
        for method in methods:
            cells = [_fmt(stat([r["best"] for r in by.get((method, name), [])])) if by.get((method, name)) else "-"
                     for name in landscapes]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Median regret relative to CMA-ES (regret / CMA-ES regret, medians; < 1 is better)", ""]
    lines += ["| method | " + " | ".join(landscapes) + " |", "| --- |" + " --- |" * len(landscapes)]
    for method in methods:
        cells = []
        for name in landscapes:
            ours, cma = by.get((method, name)), by.get(("cmaes", name))
            cells.append(
                _fmt(statistics.median(r["regret"] for r in ours) / statistics.median(r["regret"] for r in cma))
                if ours and cma else "-"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "## Search behaviour (smooth and corners; means over seeds)", ""]
    lines += [
        "| method | landscape | spread per generation | exact repeats | near-duplicates (<0.05) | best norm | "
        "basis condition numbers (median) | generator s per run | wall s per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in methods:
        for name in ("smooth", "corners"):
            group = by.get((method, name))
            if not group:
                continue
            spread = [statistics.mean(r["spread"][g] for r in group) for g in range(GENERATIONS)]
            conditions = [c for r in group for c in r.get("conditions", [])]
            cond = _fmt(statistics.median(conditions)) if conditions else "-"
            skipped = sum(len(r.get("skipped_shifts", [])) for r in group)
            if skipped:
                cond += f" ({skipped} shifts skipped)"
            gen = _fmt(statistics.mean(r["generator_seconds"] for r in group)) if "generator_seconds" in group[0] else "-"
            lines.append(
                f"| {method} | {name} | {' '.join(f'{s:.2f}' for s in spread)} | "
                f"{statistics.mean(r['exact_repeats'] for r in group):.1f} | "
                f"{statistics.mean(r['near_duplicates'] for r in group):.1f} | "
                f"{statistics.mean(r['best_norm'] for r in group):.2f} | {cond} | {gen} | "
                f"{statistics.mean(r['seconds'] for r in group):.2f} |"
            )
    lines.append("")
    lines += targets(by)
    lines += DESIGN_NOTES.splitlines()
    return "\n".join(lines)


def targets(by: dict) -> list[str]:
    """Issue 12's landscape targets, stated from the medians."""
    lines = ["## Targets (issue 12)", ""]
    median = lambda method, name, key: statistics.median(r[key] for r in by[(method, name)])  # noqa: E731
    if ("evogm_default", "corners") in by and ("random", "corners") in by:
        ours, theirs = median("evogm_default", "corners", "best"), median("random", "corners", "best")
        verdict = "met" if ours > theirs else "MISSED"
        lines.append(f"- Default beats random search on `corners` (median best): {verdict}: {ours:.3f} vs {theirs:.3f} "
                     f"(paper variant {median('evogm_paper', 'corners', 'best'):.3f}, CMA-ES "
                     f"{median('cmaes', 'corners', 'best'):.3f}).")
    if ("evogm_default", "smooth") in by and ("cmaes", "smooth") in by:
        ours, theirs = median("evogm_default", "smooth", "regret"), median("cmaes", "smooth", "regret")
        verdict = "met" if ours <= 1.5 * theirs else "MISSED"
        lines.append(f"- Default within 1.5x of CMA-ES's final regret on `smooth` (median regret): {verdict}: "
                     f"{ours:.3f} vs {theirs:.3f}, ratio {ours / theirs:.2f}.")
    lines.append("")
    return lines


DESIGN_NOTES = """## How the default was chosen

Only these landscapes were used (no model split). Exploration before this run, with the same settings and seeds
0..5 on `smooth` and `corners` (median best), varied one thing at a time from a first default (extrapolation
beta ~ U(1, 2), mutation with initial sigma 0.3, archive, scales 0.3/0.6/1.0, newer ties, guarded shift):

| change from the first default | smooth | corners |
| --- | --- | --- |
| none (beta ~ U(1, 2)) | -0.162 | -0.451 |
| beta ~ U(1, 3) | -0.175 | -0.357 |
| initial sigma 0.5 | -0.252 | -0.411 |
| one round of 7 iterations (`multi_round=False`) | -0.310 | -0.644 |

beta ~ U(1, 3) was taken for the default (better on `corners` by more than it lost on `smooth`, within seed noise
there); the larger initial step and dropping the rounds were worse on both. The ablation rows above then test each
switch of the chosen default on all five landscapes. The ablation rows were measured after the default was fixed
(no time was left to re-choose and re-run them), and they show it is not the best combination everywhere:

- `guarded_shift` did not pay here: without it the median is better on all five landscapes (by 0.001 to 0.04, within
  seed noise). With mutation and extrapolation keeping the population spread, the unguarded basis is already
  well conditioned (median condition 70 / 151 on smooth / corners, against 6e4 / 1e4 for the paper variant), so
  the guard rarely changes anything and, when it does, it skips a good elite. Candidate for turning off by default.
- `mutation` is mixed: without it smooth (-0.133 vs -0.175) and rugged are better, corners (-0.412 vs -0.357) and
  noisy (-0.233 vs -0.160) worse. It was kept for the corners target and the noisy case.
- `extrapolation`, `archive` and `task_arithmetic_scales` each help on most landscapes (their ablation rows are
  worse on smooth, corners and noisy; the archive removes 8 exact repeats per run). The task-arithmetic rows help
  here even though the optimum is not near s * ones: they add large-norm starting points along the diagonal.
- `newer_ties` changes nothing on these continuous landscapes (no two fitness values tie; identical rows); it is
  kept for coarse real scores (accuracy on a few examples), where the issue measured that ties froze the
  initial one-hots.
- The corners target is met but EvoGM default still trails CMA-ES and PSO there by about 2x in regret: the best
  candidates' norm (1.21) stays below CMA-ES's (1.50); the generators still pull towards the winners' mean and
  the round-2 uniform restarts in the new basis spend 16 evaluations far from the elites.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--landscapes", default=",".join(LANDSCAPES))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path, report_path = out / "landscapes_runs.jsonl", out / "landscapes.md"
    print(f"runs: {runs_path}\nreport: {report_path}", file=sys.stderr)
    done = {}
    if runs_path.exists():
        for line in runs_path.read_text().splitlines():
            row = json.loads(line)
            done[(row["method"], row["landscape"], row["seed"])] = row
    start = time.perf_counter()
    methods, names = args.methods.split(","), args.landscapes.split(",")
    for name in names:
        for method in methods:
            for seed in range(args.seeds):
                if (method, name, seed) in done:
                    continue
                row = run_one(method, name, seed)
                done[(method, name, seed)] = row
                with runs_path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                log.info("%s %s seed %d: best %.4f (%.1f s)", method, name, seed, row["best"], row["seconds"])
    rows = [row for key, row in done.items() if key[0] in methods and key[1] in names and key[2] < args.seeds]
    command = "python -m benchmarks.landscapes" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report_path.write_text(report(rows, args.seeds, command, time.perf_counter() - start))
    print(f"wrote {report_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
