"""Memory the release contest's static merges hold between their tuning and their scoring (issue 30): a tuned
merged-delta merge (TIES, DARE, DELLA, Breadcrumbs, ...) keeps no dense delta (`StaticMerge.rebuild` recomputes it
at the chosen settings) against the earlier design that kept one fp32 delta per target per merge until the contest
was scored.

    python -m benchmarks.contest_memory run --zoo ~/.cache/evox-merge/zoo/smollm2-seed0
    python -m benchmarks.contest_memory report    # benchmarks/results/contest_memory.md from the rows

Each mode runs in a fresh process: the zoo's experts and its first two seen tasks with 4 examples each (the scores
do not matter here, only what the tuned merges keep), every merged-delta data-free merge tuned in turn and kept, as
the contest keeps them. ``held`` keeps each merge's deltas (``merge.deltas = merge.delta_dict()``: what the earlier
design kept); ``lazy`` is the library as it is. Recorded: resident memory (VmRSS) after loading and after all merges
are tuned, the bytes of dense tensors the merges hold, and the process's peak. Rows go to
benchmarks/results/contest_memory.jsonl.
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

OUT = Path("benchmarks/results/contest_memory.jsonl")
REPORT = Path("benchmarks/results/contest_memory.md")
MERGES = ["ties", "dare", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "model_stock", "nuslerp",
          "multislerp", "sce", "rankmean"]
"""The data-free merges that give merged deltas (`evox_merge.problems.static_names`); slerp is left out as it
interpolates the whole weights of two experts the same way nuslerp does."""


def _rss_gib() -> float:
    """Resident memory now (VmRSS), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(zoo_dir: str, mode: str, merges: list[str]) -> dict:
    """Tune `merges` in this process and keep them: the row."""
    import torch

    from evox_merge.experts import ExpertSet
    from evox_merge.problems.merge_problem import MergeProblem
    from evox_merge.problems.static_merges import tune_static_merge
    from evox_merge.tasks import read_task, split_task
    from evox_merge.zoo.loading import load_zoo

    torch.set_num_threads(1)
    zoo = load_zoo(zoo_dir)
    tasks = [split_task(read_task(spec), 0.3, 4)[0] for spec in zoo.seen_tasks[:2]]
    experts = ExpertSet.load(zoo.base_dir, zoo.adapter_dirs)
    problem = MergeProblem(experts, tasks, batch_size=8)
    loaded = _rss_gib()
    kept, started = [], time.perf_counter()
    for name in merges:
        merge = tune_static_merge(name, problem, seed=0)
        if mode == "held":
            merge.deltas = merge.delta_dict()
        kept.append(merge)
    tuned = time.perf_counter() - started
    after = _rss_gib()
    held = sum(t.numel() * t.element_size() for m in kept if m.deltas is not None for t in m.deltas.values())
    started = time.perf_counter()
    for merge in kept:  # what the contest does next: score each merge again (here on the same problem)
        merge.score(problem)
    rescored = time.perf_counter() - started
    one = sum(t.numel() * t.element_size() for t in kept[0].delta_dict().values())
    return {"zoo": zoo.preset, "mode": mode, "merges": merges, "targets": len(experts.target_names),
            "one_delta_gib": round(one / 2**30, 3), "rss_loaded_gib": round(loaded, 3),
            "rss_after_tuning_gib": round(after, 3), "held_gib": round(held / 2**30, 3),
            "rss_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "tuning_s": round(tuned, 1), "rescoring_s": round(rescored, 1), "torch": torch.__version__}


def run(args: argparse.Namespace) -> None:
    from evox_merge.util.machine import host_description

    OUT.parent.mkdir(parents=True, exist_ok=True)
    for mode in ("held", "lazy"):
        command = [sys.executable, "-m", "benchmarks.contest_memory", "one", "--zoo", args.zoo, "--mode", mode,
                   "--merges", *args.merges]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{mode} failed")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row.update(machine=host_description(), date=time.strftime("%Y-%m-%d"))
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))


def report() -> None:
    rows = [json.loads(line) for line in OUT.read_text().splitlines() if line.strip()]
    lines = ["# Memory the release contest's static merges hold", "",
             "`python -m benchmarks.contest_memory run --zoo ~/.cache/evox-merge/zoo/smollm2-seed0`, then "
             "`python -m benchmarks.contest_memory report` (module docstring: what is measured).", "",
             "| zoo | mode | merges | one merge's delta (GiB) | RSS loaded | RSS after tuning all | held by the merges "
             "| peak RSS | tuning s | rescoring s | date |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['zoo']} | {r['mode']} | {len(r['merges'])} | {r['one_delta_gib']} | {r['rss_loaded_gib']} "
                     f"| {r['rss_after_tuning_gib']} | {r['held_gib']} | {r['rss_peak_gib']} | {r['tuning_s']} "
                     f"| {r['rescoring_s']} | {r['date']} |")
    lines += ["", f"Machine: {rows[-1]['machine']}; torch {rows[-1]['torch']}, one thread.", ""]
    REPORT.write_text("\n".join(lines) + "\n")
    print(REPORT.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("one", help="one mode in this process; prints its row")
    one.add_argument("--zoo", required=True)
    one.add_argument("--mode", choices=["held", "lazy"], required=True)
    one.add_argument("--merges", nargs="+", default=MERGES)
    r = sub.add_parser("run", help="both modes, each in a fresh process; appends the rows")
    r.add_argument("--zoo", required=True)
    r.add_argument("--merges", nargs="+", default=MERGES)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "one":
        print(json.dumps(measure(args.zoo, args.mode, args.merges)))
    elif args.command == "run":
        run(args)
    else:
        report()


if __name__ == "__main__":
    main()
