"""Fixed subset against a fresh subsample per generation, at equal evaluation cost (issue 29, point 4).

    python -m benchmarks.subsample [--seeds 0 1 2 3] [--sizes 16 32] [--methods cmaes evogm] [--report-only]

Tiny zoo, multi-task unseen (10 tasks). Each validation file (100 examples) is split as a search always splits it:
a selection part of 30 and a search part of 70. Per method, size m and seed, two searches of 8 generations:

* ``fixed``: every candidate scored on the same first m examples of each task's search part (what
  ``max_validation_examples: m`` does): P = 16, 128 candidates scored on m examples per task;
* ``fresh``: subsample mode (`evox_merge.problems.subsample`, ``size: m, elites: 2``) over the whole search part:
  P = 14 plus the 2 elites re-scored each generation, 126 candidate scorings on m examples per task.

Both use the same normalisation (anchored on the full search part). Each search's pick is the best of its top 5
(by its own search fitness: the records for ``fixed``, the estimates for ``fresh``) on the selection part, as the
sweep picks. Rows hold the pick's selection-part fitness (what chose it), its fitness on the full 70-example
search part and its test scores (500 examples per task; reported, never used to choose). Welch p-values compare
the arms over seeds. Rows go to ``benchmarks/results/subsample/rows.jsonl`` as each run finishes (a rerun skips
finished runs); the tables to ``benchmarks/results/subsample/results.md`` (the reading is in
``benchmarks/results/subsample.md``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from scipy.stats import ttest_ind

from benchmarks.sweep.config import SetupConfig
from benchmarks.sweep.setup import load_setup
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.normalisation import anchor_normalisation
from evox_merge.problems.subsample import Subsampler, SubsampleSettings
from evox_merge.run.loop import search
from evox_merge.run.registry import build_algorithm, is_evogm
from evox_merge.run.selection import searched_candidates, select_release
from evox_merge.tasks import Task, read_task, split_task
from evox_merge.util.atomic import write_text_atomic
from evox_merge.util.machine import host_description, machine_markdown

OUT = Path("benchmarks/results/subsample")
POP, ELITES, GENERATIONS, TOP_K, SELECTION_FRACTION = 16, 2, 8, 5, 0.3


class Bench:
    """The zoo's experts and the multi-task-unseen problems, built once."""

    def __init__(self) -> None:
        setup = load_setup(SetupConfig(zoo_preset="tiny", zoo_seed=0))
        self.experts = setup.experts
        specs = [setup.specs[name] for name in setup.unseen]
        parts = [split_task(read_task(spec), SELECTION_FRACTION) for spec in specs]
        self.search_parts = [search_part for search_part, _ in parts]
        self.search = MergeProblem(self.experts, self.search_parts, batch_size=128)
        normalisation = anchor_normalisation(self.search)
        self.search.normalise(normalisation)
        self.selection = MergeProblem(self.experts, [sel for _, sel in parts], batch_size=128).normalise(normalisation)
        self.test = MergeProblem(self.experts, [read_task(spec.with_split("test")) for spec in specs],
                                 batch_size=128).normalise(normalisation)
        self.normalisation = normalisation
        self._fixed: dict[int, MergeProblem] = {}

    def fixed(self, size: int) -> MergeProblem:
        """The search part cut to its first `size` examples per task (``max_validation_examples: size``)."""
        if size not in self._fixed:
            self._fixed[size] = MergeProblem(self.experts, [Task(t.spec, t.records[:size]) for t in self.search_parts],
                                             batch_size=128).normalise(self.normalisation)
        return self._fixed[size]


def _algorithm(method: str, dim: int, pop_size: int, seed: int):
    params = {"num_rounds": 2, "iterations_per_round": 3} if is_evogm(method) else {}
    return build_algorithm(method, dim, pop_size=pop_size, seed=seed, params=params)


def run_one(bench: Bench, method: str, arm: str, size: int, seed: int) -> dict:
    """One search and its pick's scores (a row)."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    if arm == "fixed":
        problem = bench.fixed(size)
        monitor = search(_algorithm(method, problem.dim, POP, seed), problem, GENERATIONS)
        pool, scorings, distinct = monitor.records, len(monitor.records), size
    else:
        problem = bench.search
        subsampler = Subsampler(SubsampleSettings(size, ELITES, seed), problem.task_names,
                                [len(task.records) for task in problem.tasks])
        monitor = search(_algorithm(method, problem.dim, POP - ELITES, seed), problem, GENERATIONS,
                         subsample=subsampler)
        pool = subsampler.release_pool(problem, TOP_K, rescore=False)  # the same 5 the release contest gets
        scorings = subsampler.candidates + subsampler.rescorings
        distinct = min(subsampler.summary()["distinct_examples_seen"].values())
    pick = select_release(searched_candidates(pool, TOP_K), bench.selection)
    search_full = float(bench.search.aggregate(pick.merge.score(bench.search).unsqueeze(0))[0])
    test_scores = pick.merge.score(bench.test)
    return {"method": method, "arm": arm, "size": size, "seed": seed, "selection": pick.selection_fitness,
            "search_full": search_full, "test": float(test_scores.double() @ bench.test.task_weights),
            "test_normalised": float(bench.test.aggregate(test_scores.unsqueeze(0))[0]),
            "scorings": scorings, "distinct_examples_per_task": distinct, "pick": pick.name,
            "seconds": time.perf_counter() - started, "host": host_description()}


def _key(row: dict) -> tuple:
    return row["method"], row["arm"], row["size"], row["seed"]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _cell(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{spread}" if values else ""


def _p(a: list[float], b: list[float]) -> str:
    if len(a) < 2 or len(b) < 2:
        return ""
    return f"{ttest_ind(a, b, equal_var=False).pvalue:.3g}"


def report(rows: list[dict], seeds: list[int], sizes: list[int], methods: list[str]) -> str:
    """The markdown report of the finished rows."""
    lines = ["| method | m | arm | runs | scorings | distinct examples / task | selection (normalised) | "
             "full search part (normalised) | test (raw mean) | test (normalised) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    tests = ["| method | m | fresh - fixed, selection | p (selection) | fresh - fixed, test raw | p (test raw) | "
             "p (test normalised) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for method in methods:
        for size in sizes:
            arms = {arm: sorted((r for r in rows if (r["method"], r["size"], r["arm"]) == (method, size, arm)),
                                key=lambda r: r["seed"]) for arm in ("fixed", "fresh")}
            for arm, group in arms.items():
                if not group:
                    continue
                column = lambda key: [r[key] for r in group]  # noqa: E731
                lines.append(f"| {method} | {size} | {arm} | {len(group)} | {statistics.mean(column('scorings')):.0f} "
                             f"| {statistics.mean(column('distinct_examples_per_task')):.0f} | "
                             f"{_cell(column('selection'))} | {_cell(column('search_full'))} | "
                             f"{_cell(column('test'))} | {_cell(column('test_normalised'))} |")
            fixed, fresh = arms["fixed"], arms["fresh"]
            if fixed and fresh:
                get = lambda group, key: [r[key] for r in group]  # noqa: E731
                diff = lambda key: statistics.mean(get(fresh, key)) - statistics.mean(get(fixed, key))  # noqa: E731
                tests.append(f"| {method} | {size} | {diff('selection'):+.4f} | "
                             f"{_p(get(fresh, 'selection'), get(fixed, 'selection'))} | {diff('test'):+.4f} | "
                             f"{_p(get(fresh, 'test'), get(fixed, 'test'))} | "
                             f"{_p(get(fresh, 'test_normalised'), get(fixed, 'test_normalised'))} |")
    minutes = sum(r["seconds"] for r in rows) / 60
    hosts = sorted({r["host"] for r in rows})
    return "\n".join([*lines, "", *tests, "", f"{len(rows)} runs, {minutes:.1f} minutes of wall time in all "
                      f"(sum of the runs; {', '.join(hosts)}). Seeds run: {seeds}."])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--methods", nargs="+", default=["cmaes", "evogm"])
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    rows_path = OUT / "rows.jsonl"
    done = {_key(row) for row in read_rows(rows_path)}
    todo = [(method, arm, size, seed) for seed in args.seeds for size in args.sizes for method in args.methods
            for arm in ("fixed", "fresh") if (method, arm, size, seed) not in done]
    if todo and not args.report_only:
        bench = Bench()
        for method, arm, size, seed in todo:
            row = run_one(bench, method, arm, size, seed)
            with open(rows_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(f"{method} {arm} m={size} seed {seed}: selection {row['selection']:.4f} test {row['test']:.4f} "
                  f"({row['seconds']:.0f} s)", flush=True)
    rows = read_rows(rows_path)
    table = report(rows, sorted({r["seed"] for r in rows}), args.sizes, args.methods)
    write_text_atomic(OUT / "results.md", f"# Fixed subset vs fresh subsample (generated by benchmarks/subsample.py)"
                      f"\n\n{table}\n\nMachine:\n{machine_markdown()}\n")
    print(table)


if __name__ == "__main__":
    main()
