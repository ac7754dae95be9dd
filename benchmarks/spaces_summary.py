"""Search spaces side by side: expert vs layer vs operator at equal evaluation budget (benchmarks/results/beyond_hull.md).

    python -m benchmarks.spaces_summary [--expert benchmarks/results/search_quality]
        [--layer benchmarks/results/space_layer] [--operator benchmarks/results/space_operator]

Reads each sweep's rows.jsonl (`benchmarks/configs/search_quality.yaml` for the expert space, `space_layer.yaml`,
`space_operator.yaml`: the same zoo, tasks, split, budgets and seeds), keeps the multi-task unseen cells of the seeds
every sweep ran, and prints a Markdown table per search: test (raw mean over the tasks) and search-part fitness,
mean ± std over seeds, the Welch p-value against the expert space, and the mean evaluation seconds per run (compare
those only between rows that ran on the same machine).

    python -m benchmarks.spaces_summary --time 16 [--time-operator] [--preset smollm2]

also measures seconds per candidate in each space side by side, in one process: the same `--time` random candidates
(written in each space from the same expert-space rows) on a zoo's (`--preset`, default tiny) multi-task unseen
search part (at most 32 examples per task), interleaved over 3 repeats, median; `--time-operator` times building one
TIES candidate's deltas over every target layer with peft's `merge_utils.ties` against ours, with and without the
sorted tables, whole layer and block by block (the operator space's extra cost per candidate), side by side.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.racing_summary import p_text, sweep_rows
from benchmarks.sweep.report import mean_std, ran_on

SETTING = "multi_task_unseen"


def summary(folders: dict[str, Path], methods: tuple[str, ...] = ("evogm", "cmaes")) -> str:
    rows = {space: sweep_rows(folder, SETTING) if (folder / "rows.jsonl").is_file() else {}
            for space, folder in folders.items()}
    seeds = sorted(set.intersection(*({s for _, _, s in r} for r in rows.values() if r)))
    lines = [f"Seeds {seeds} (those every sweep ran), {SETTING}.", "",
             "| search | budget | space | test | search part | p (vs expert space) | evaluation s / run | ran on |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    budgets = [b for b in ("paper", "large") if any(key[1] == b for found in rows.values() for key in found)]
    for method in methods:
        for budget in budgets:
            expert = [rows["expert"].get((method, budget, s)) for s in seeds]
            for space, found in rows.items():
                cells = [found.get((method, budget, s)) for s in seeds]
                if not all(cells):
                    lines.append(f"| {method} | {budget} | {space} | (not run) | | | | |")
                    continue
                test = [c["test"] for c in cells]
                p = "" if space == "expert" or not all(expert) else p_text(test, [c["test"] for c in expert])
                lines.append(
                    f"| {method} | {budget} | {space} | {mean_std(test)} | {mean_std([c['validation'] for c in cells])} "
                    f"| {p} | {statistics.mean(c['evaluation_seconds'] for c in cells):.0f} "
                    f"| {ran_on(cells)} |")
    statics = {m: r["test"] for folder in folders.values() if (folder / "rows.jsonl").is_file()
               for (m, _, _), r in sweep_rows(folder, SETTING, searches=False).items() if m not in ("base",)}
    lines += ["", "Static merges (tuned on the search part; the same in every sweep): "
              + ", ".join(f"{m} {test:.4f}" for m, test in sorted(statics.items())) + "."]
    return "\n".join(lines)


def time_spaces(candidates: int, repeats: int = 3, preset: str = "tiny") -> str:
    """Seconds per candidate of the expert, layer and operator spaces on the same problem, side by side."""
    import time

    import torch

    from evox_merge.experts import ExpertSet
    from evox_merge.experts.spaces import build_space
    from evox_merge.problems.merge_problem import MergeProblem
    from evox_merge.run.zoo_search import zoo_paths
    from evox_merge.tasks import read_task, split_task

    torch.set_num_threads(1)
    base, adapters, _, unseen = zoo_paths(preset, 0, None)
    experts = ExpertSet.load(base, adapters)
    tasks = [split_task(read_task(spec), 0.3, 32)[0] for spec in unseen]
    spaces = {"expert": {}, "layer": {"groups": 2}, "operator": {"method": "ties"}}
    problems = {name: MergeProblem(experts, tasks, batch_size=128, space=build_space(
        list(experts.target_names), experts.expert_names, name, **options)) for name, options in spaces.items()}
    rows = torch.rand(candidates, experts.num_experts, generator=torch.Generator().manual_seed(0))
    seconds: dict[str, list[float]] = {name: [] for name in spaces}
    for _ in range(repeats):
        for name, problem in problems.items():
            started = time.perf_counter()
            problem.evaluate_per_task(problem.in_space(rows))
            seconds[name].append((time.perf_counter() - started) / candidates)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    lines = [f"Seconds per candidate, {preset} zoo ({candidates} candidates, median of {repeats} interleaved repeats, "
             "one thread):",
             "", "| space | s / candidate | vs expert |", "| --- | --- | --- |"]
    lines += [f"| {name} | {value:.3f} | {value / median['expert']:.2f}x |" for name, value in median.items()]
    return "\n".join(lines)


def time_operator(preset: str, repeats: int = 3) -> str:
    """Seconds to build one operator-space (TIES) candidate's deltas over every target layer of a zoo: peft's
    ``merge_utils.ties`` (``topk`` pruning per expert) against ours (threshold pruning,
    `evox_merge.experts.kernel.magnitude_prune`, then peft's sign election and merge) with ``kthvalue`` thresholds
    (the static merge) and with the operator space's sorted tables, whole layer at once or block by block of rows
    (`evox_merge.experts.kernel.ties_layer_delta`, the operator space); interleaved, median; and how many merged
    entries differ from peft's."""
    import time

    import torch
    from peft.utils import merge_utils

    from evox_merge.experts import ExpertSet
    from evox_merge.experts.kernel import _ties_merge, magnitude_prune, operator_delta, target_task_vectors
    from evox_merge.experts.spaces import build_space
    from evox_merge.run.zoo_search import zoo_paths

    torch.set_num_threads(1)
    base, adapters, _, _ = zoo_paths(preset, 0, None)
    experts = ExpertSet.load(base, adapters)
    n, weights, density = experts.num_experts, torch.linspace(0.2, 0.9, experts.num_experts), 0.4
    names = list(experts.target_names)
    targets = [experts.targets[name] for name in names]
    space = build_space(names, experts.expert_names, "operator", method="ties")
    candidate = torch.cat([torch.tensor([2 * density - 1]), weights])
    started = time.perf_counter()
    space.deltas(candidate, experts.targets)  # the first candidate sorts the magnitude tables
    first_candidate = time.perf_counter() - started
    tables = [space._magnitudes(name, target) for name, target in zip(names, targets)]

    def peft_ties() -> list[torch.Tensor]:
        return [merge_utils.ties(list(target_task_vectors(t, n)), weights, density) for t in targets]

    def whole(table) -> list[torch.Tensor]:
        return [_ties_merge(magnitude_prune(target_task_vectors(t, n), density, table(i)), weights)
                for i, t in enumerate(targets)]

    def blocks(table) -> list[torch.Tensor]:
        return [operator_delta(t, n, "ties", weights, density, table(i)) for i, t in enumerate(targets)]

    builds = {"peft merge_utils.ties": peft_ties,
              "ours, kthvalue thresholds (the static TIES merge)": lambda: blocks(lambda i: None),
              "ours, sorted tables, whole layer (session 8's operator space)": lambda: whole(tables.__getitem__),
              "ours, sorted tables, blocks of rows (the operator space)": lambda: blocks(tables.__getitem__)}
    seconds: dict[str, list[float]] = {name: [] for name in builds}
    for _ in range(repeats):
        for name, build in builds.items():
            started = time.perf_counter()
            build()
            seconds[name].append(time.perf_counter() - started)
    expected, mine = peft_ties(), blocks(lambda i: None)
    differ = sum(int((a != b).sum()) for a, b in zip(expected, mine))  # entries tied at a threshold
    assert all(torch.equal(a, b) for a, b in zip(mine, space.deltas(candidate, experts.targets).values()))
    assert all(torch.equal(a, b) for a, b in zip(mine, whole(tables.__getitem__)))
    entries = sum(delta.numel() for delta in expected)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    first = next(iter(median.values()))
    lines = [f"One TIES candidate's deltas, {preset} zoo ({len(targets)} target layers, {n} experts, {entries:,} "
             f"entries per expert; density {density}; median of {repeats} interleaved repeats, one thread; "
             f"merged entries that differ from peft's: {differ:,}, entries tied exactly at a pruning threshold, which "
             "topk keeps one of and ours keeps all of; ours are equal to each other entry for entry):", "",
             "| implementation | s / candidate | speed-up |", "| --- | --- | --- |"]
    lines += [f"| {name} | {value:.2f} | {first / value:.2f}x |" for name, value in median.items()]
    lines += ["", f"The operator space's first candidate, which also sorts the tables: {first_candidate:.2f} s."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    results = Path("benchmarks/results")
    parser.add_argument("--expert", type=Path, default=results / "search_quality")
    parser.add_argument("--layer", type=Path, default=results / "space_layer")
    parser.add_argument("--operator", type=Path, default=results / "space_operator")
    parser.add_argument("--time", type=int, default=0, help="also time this many candidates in each space")
    parser.add_argument("--time-operator", action="store_true",
                        help="also time one TIES candidate's merge: peft's merge_utils.ties against ours")
    parser.add_argument("--preset", default="tiny", help="zoo preset for --time and --time-operator (tiny, smollm2)")
    args = parser.parse_args()
    print(summary({"expert": args.expert, "layer": args.layer, "operator": args.operator}))
    if args.time:
        print("\n" + time_spaces(args.time, preset=args.preset))
    if args.time_operator:
        print("\n" + time_operator(args.preset))


if __name__ == "__main__":
    main()
