"""Seconds per candidate with chunked token log-probabilities (`evox_merge.tasks.logprobs`) against the full-logits
path they replaced: the same zoo, tasks and population, the two paths interleaved in one process.

    python -m benchmarks.logprobs_speed --preset smollm2 --population 2 --repeats 3 --threads 1

The zoo's base and experts (its cached build), the first validation task of each kind (multiple choice,
generation, language modelling) at most --examples examples each, `MergeProblem.evaluate` of a fixed random
population; a repeat runs both paths (in alternating order), and the report gives each path's median seconds per
candidate, the ratio and whether the scores agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import evox_merge.tasks.logprobs as logprobs_module
from evox_merge.experts import ExpertSet
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.tasks import read_task
from evox_merge.util.machine import describe_machine
from evox_merge.zoo import build_zoo, load_zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--population", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = load_zoo(build_zoo(preset=args.preset, progress=False))
    experts = ExpertSet.load(zoo.base_dir, zoo.adapter_dirs)
    tasks, kinds = [], set()
    for spec in zoo.tasks:
        if spec.type not in kinds:
            kinds.add(spec.type)
            task = read_task(spec)
            tasks.append(type(task)(spec=task.spec, records=task.records[: args.examples]))
    problem = MergeProblem(experts, tasks, batch_size=args.batch_size)
    population = torch.rand(args.population, experts.num_experts, generator=torch.Generator().manual_seed(0))
    checked = logprobs_module._checked_head
    paths = {"chunked": checked, "full logits": lambda model, copies: None}
    seconds = {name: [] for name in paths}
    scores = {}
    for repeat in range(args.repeats):
        for name in (list(paths) if repeat % 2 == 0 else list(paths)[::-1]):
            logprobs_module._checked_head = paths[name]
            started = time.perf_counter()
            scores[name] = problem.evaluate_per_task(population)
            seconds[name].append((time.perf_counter() - started) / args.population)
    logprobs_module._checked_head = checked
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    difference = float((scores["chunked"] - scores["full logits"]).abs().max())
    machine = describe_machine()
    print(f"preset {args.preset}, tasks {[t.spec.name for t in tasks]} ({args.examples} examples each), batch size "
          f"{args.batch_size}, population {args.population}, {args.repeats} repeats, {args.threads} thread(s), "
          f"{machine['cpu']} ({machine['cores']} cores)")
    for name, median in medians.items():
        print(f"  {name}: {median:.2f} s / candidate (each repeat: {[round(s, 2) for s in seconds[name]]})")
    print(f"  chunked / full: {medians['chunked'] / medians['full logits']:.3f}; largest score difference "
          f"{difference:.2e}")


if __name__ == "__main__":
    main()
