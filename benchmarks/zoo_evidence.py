"""Evidence that the offline zoo is a real merging problem: writes ``benchmarks/results/zoo.md``.

Every score comes from `MergeProblem` (the scorer every search uses), on each task's validation and test splits:
the base, each expert alone, the uniform average of all experts, task arithmetic with its scaling tuned on
validation (per task), and the best of 200 random coefficient vectors chosen on validation (per task). It checks
the three claims of the zoo's issue and reports the validation-vs-test correlation of candidate scores.

    python benchmarks/zoo_evidence.py                       # builds (or reuses) the cached tiny zoo
    python benchmarks/zoo_evidence.py --zoo DIR --out benchmarks/results/zoo.md
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from evox_merge.experts import ExpertSet
from evox_merge.problems import MergeProblem
from evox_merge.zoo import build_zoo, load_zoo

TA_SCALES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
KEEP_MARKER = "<!-- Written by hand below this line; zoo_evidence.py keeps it when it rewrites the tables. -->"
CLEAR_MARGIN = 0.10  # an expert "clearly" beats the base on its own task by at least this much (test)


def random_coefficients(num: int, num_experts: int, seed: int, keep: float, high: float) -> torch.Tensor:
    """``(num, N)`` random merges: each coefficient is uniform in [0, high] with probability `keep`, else 0 (every
    vector keeps at least one expert)."""
    generator = torch.Generator().manual_seed(seed)
    values = high * torch.rand(num, num_experts, generator=generator)
    kept = torch.rand(num, num_experts, generator=generator) < keep
    empty = ~kept.any(dim=1)
    kept[empty, torch.randint(num_experts, (int(empty.sum()),), generator=generator)] = True
    return values * kept


def candidate_pool(
    num_experts: int, num_random: int, seed: int, keep: float, high: float
) -> tuple[list[str], torch.Tensor]:
    """Names and ``(C, N)`` coefficients: base, each expert, uniform average, task arithmetic grid, random."""
    eye = torch.eye(num_experts)
    names = ["base", *[f"expert{i}" for i in range(num_experts)], "uniform"]
    rows = [torch.zeros(num_experts), *eye, torch.full((num_experts,), 1.0 / num_experts)]
    for scale in TA_SCALES:
        names.append(f"ta{scale:g}")
        rows.append(torch.full((num_experts,), scale))
    randoms = random_coefficients(num_random, num_experts, seed, keep, high)
    names += [f"random{i}" for i in range(num_random)]
    return names, torch.cat([torch.stack(rows), randoms])


def score_pool(problem: MergeProblem, pool: torch.Tensor, rows: list[int], description: str) -> torch.Tensor:
    """``(C, K)`` scores of the candidates `rows` of `pool` (NaN elsewhere), ten at a time behind a progress bar."""
    scores = torch.full((pool.shape[0], len(problem.tasks)), math.nan, dtype=torch.float64)
    for start in tqdm(range(0, len(rows), 10), desc=description, unit="x10 candidates"):
        chunk = rows[start : start + 10]
        scores[chunk] = problem.evaluate_per_task(pool[chunk])
    return scores


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors (NaN if either is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.norm() * y.norm()).item()
    return (x @ y).item() / denominator if denominator > 0 else math.nan


def random_search_picks(names: list[str], validation: torch.Tensor) -> list[int]:
    """Per task, the random candidate with the best validation score (the first among ties)."""
    random_rows = [i for i, name in enumerate(names) if name.startswith("random")]
    return [random_rows[int(torch.argmax(validation[random_rows, k]))] for k in range(validation.shape[1])]


def analyse(names: list[str], validation: torch.Tensor, test: torch.Tensor, zoo, correlation_rows: list[int]) -> dict:
    """Per task: the baselines' validation/test scores, the picks tuned on validation, and the checks;
    validation-vs-test correlations over the candidates `correlation_rows`."""
    index = {name: i for i, name in enumerate(names)}
    experts = zoo.expert_names
    ta_rows = [index[f"ta{s:g}"] for s in TA_SCALES]
    picks = random_search_picks(names, validation)
    tasks = {}
    for k, spec in enumerate(zoo.tasks):
        group = zoo.manifest["tasks"][spec.name]["group"]
        ta_pick = ta_rows[int(torch.argmax(validation[ta_rows, k]))]  # first (smallest scale) among ties
        random_pick = picks[k]
        row = {
            "group": group,
            "type": spec.type,
            "families": zoo.task_families(spec.name),
            "n_validation": None,
            "base": [validation[0, k].item(), test[0, k].item()],
            "experts": {e: [validation[1 + i, k].item(), test[1 + i, k].item()] for i, e in enumerate(experts)},
            "uniform": [validation[index["uniform"], k].item(), test[index["uniform"], k].item()],
            "task_arithmetic": [validation[ta_pick, k].item(), test[ta_pick, k].item()],
            "task_arithmetic_scale": float(names[ta_pick][2:]),
            "random_search": [validation[random_pick, k].item(), test[random_pick, k].item()],
            "random_search_pick": names[random_pick],
            "val_test_correlation": pearson(validation[correlation_rows, k], test[correlation_rows, k]),
        }
        best_expert = max(experts, key=lambda e: row["experts"][e][1])
        row["best_single_expert"] = best_expert
        if group == "seen":
            own = row["experts"][spec.name][1]
            row["margin_over_base"] = own - row["base"][1]
            row["check"] = row["margin_over_base"] >= CLEAR_MARGIN
        else:
            rs_test = row["random_search"][1]
            row["check"] = rs_test > row["base"][1] and rs_test > row["experts"][best_expert][1]
        tasks[spec.name] = row
    pooled = pearson(validation[correlation_rows].flatten(), test[correlation_rows].flatten())
    return {"tasks": tasks, "pooled_val_test_correlation": pooled}


def _f(value: float) -> str:
    return f"{value:.2f}"


def render(result: dict, context: dict) -> str:
    """The Markdown report."""
    tasks = result["tasks"]
    experts = context["experts"]
    seen = [n for n, t in tasks.items() if t["group"] == "seen"]
    unseen = [n for n, t in tasks.items() if t["group"] == "unseen"]
    seen_ok = sum(tasks[n]["check"] for n in seen)
    unseen_ok = sum(tasks[n]["check"] for n in unseen)
    lines = [
        "# The offline zoo is a real merging problem",
        "",
        f"Generated by `python benchmarks/zoo_evidence.py` on the `{context['preset']}` zoo (seed {context['seed']}); "
        "every score is `MergeProblem.evaluate_per_task` (exact match after whitespace normalisation for "
        "generation, argmax summed log-likelihood for multiple choice).",
        "",
        f"- Zoo: {context['zoo_summary']}",
        f"- Build: {context['build']}",
        f"- Splits: validation {context['n_validation']} / test {context['n_test']} examples per task. "
        f"Evidence run: {context['candidates']} candidates on validation and {context['test_candidates']} on "
        f"test, x {len(tasks)} tasks, in {context['eval_seconds'] / 60:.0f} min ({context['machine']}).",
        f"- Random search: {context['num_random']} vectors, each coefficient uniform in [0, {context['high']:g}] "
        f"with probability {context['keep']:g} and 0 otherwise (seed {context['random_seed']}); the vector with the "
        "best "
        "**validation** score on a task is its pick, and its test score is reported. Task arithmetic: all "
        f"coefficients equal to a scale in {{{', '.join(f'{s:g}' for s in TA_SCALES)}}}, the scale chosen on "
        "validation per task. Uniform: all coefficients 1/N.",
        "",
        "## Checks",
        "",
        f"1. Every expert beats the base on its own seen task by at least {CLEAR_MARGIN:.2f} (test): "
        f"**{seen_ok}/{len(seen)}**"
        + (" - pass." if seen_ok == len(seen) else " - FAIL."),
        f"2. On unseen tasks, the random-search merge chosen on validation beats both the base and the best single "
        f"expert (the expert with the highest *test* score, a strict baseline) on test: **{unseen_ok}/{len(unseen)}**"
        + (" - pass (at least half)." if 2 * unseen_ok >= len(unseen) else " - FAIL (fewer than half)."),
        f"3. Validation-vs-test Pearson correlation of the scores of the first {context['test_random']} random "
        "candidates (all of them scored on both splits): pooled over tasks "
        f"**{result['pooled_val_test_correlation']:.2f}**; per task in the last column below (median "
        f"{_median([t['val_test_correlation'] for t in tasks.values()]):.2f}).",
        "",
        "## Summary (test)",
        "",
        "| task | group | type | base | own / best expert | uniform | task arith. (scale) | random search | "
        "check | val-test r |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in tasks.items():
        if t["group"] == "seen":
            expert_cell = f"{_f(t['experts'][name][1])} (own)"
        else:
            best = t["best_single_expert"]
            expert_cell = f"{_f(t['experts'][best][1])} ({best})"
        lines.append(
            f"| {name} | {t['group']} | {'MC' if t['type'] == 'multiple_choice' else 'gen'} | {_f(t['base'][1])} | "
            f"{expert_cell} | {_f(t['uniform'][1])} | {_f(t['task_arithmetic'][1])} ({t['task_arithmetic_scale']:g}) | "
            f"{_f(t['random_search'][1])} | {'yes' if t['check'] else 'no'} | {t['val_test_correlation']:.2f} |"
        )
    lines += [
        "",
        "## Every score (validation / test)",
        "",
        "| task | base | " + " | ".join(experts) + " | uniform | task arith. | random search |",
        "|---|" + "---|" * (len(experts) + 4),
    ]
    for name, t in tasks.items():
        cells = [t["base"], *[t["experts"][e] for e in experts], t["uniform"], t["task_arithmetic"], t["random_search"]]
        lines.append(f"| {name} | " + " | ".join(f"{_f(v)} / {_f(s)}" for v, s in cells) + " |")
    lines += ["", KEEP_MARKER, context["kept"]]
    return "\n".join(lines)


def _hand_written(path: Path) -> str:
    """The part of an existing report after `KEEP_MARKER` (the design notes, kept across reruns)."""
    if not path.is_file():
        return ""
    text = path.read_text()
    return text.split(KEEP_MARKER, 1)[1].lstrip("\n") if KEEP_MARKER in text else ""


def _expert_shape(name: str, shape: dict, standard: tuple[str, ...]) -> str:
    targets = tuple(shape["target_modules"])
    return f"{name} r{shape['rank']}" + ("" if targets == standard else f" on {'/'.join(targets)}")


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if not math.isnan(v))
    return finite[len(finite) // 2] if finite else math.nan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", help="zoo directory (default: build or reuse the cached zoo of --preset/--seed)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=200, help="random coefficient vectors")
    parser.add_argument("--keep", type=float, default=0.35, help="probability that a random coefficient is non-zero")
    parser.add_argument("--high", type=float, default=1.25, help="non-zero random coefficients: uniform in [0, high]")
    parser.add_argument("--test-random", type=int, default=100,
                        help="random candidates (the first ones) also scored on test, for the correlation")
    parser.add_argument("--random-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "zoo.md"))
    parser.add_argument("--build-note", default="", help="build time and size, as measured")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    zoo = load_zoo(args.zoo or build_zoo(preset=args.preset, seed=args.seed))
    experts = ExpertSet.load(zoo.base_dir, zoo.adapter_dirs)
    validation_problem = MergeProblem(experts, zoo.tasks, batch_size=args.batch_size)
    test_problem = MergeProblem(experts, [spec.with_split("test") for spec in zoo.tasks], batch_size=args.batch_size)
    names, pool = candidate_pool(experts.num_experts, args.candidates, args.random_seed, args.keep, args.high)
    start = time.perf_counter()
    validation = score_pool(validation_problem, pool, list(range(len(names))), "validation")
    correlation_rows = [i for i, name in enumerate(names) if name.startswith("random")][: args.test_random]
    fixed_rows = [i for i, name in enumerate(names) if not name.startswith("random")]
    test_rows = sorted(set(fixed_rows + correlation_rows + random_search_picks(names, validation)))
    test = score_pool(test_problem, pool, test_rows, "test")
    eval_seconds = time.perf_counter() - start

    result = analyse(names, validation, test, zoo, correlation_rows)
    settings = zoo.manifest["settings"]
    size_mb = sum(p.stat().st_size for p in zoo.root.rglob("*") if p.is_file()) / 1e6
    n_params = sum(p.numel() for p in experts.model.parameters())
    shapes = settings["experts"]
    standard = max((tuple(s["target_modules"]) for s in shapes.values()), key=list(
        tuple(s["target_modules"]) for s in shapes.values()).count)
    context = {
        "preset": zoo.preset,
        "seed": zoo.seed,
        "experts": zoo.expert_names,
        "zoo_summary": (
            f"Qwen2 base, hidden {settings['hidden_size']}, {settings['num_layers']} layers, {n_params / 1e6:.2f}M "
            f"parameters, {len(zoo.expert_names)} LoRA experts ("
            + ", ".join(_expert_shape(e, shapes[e], standard) for e in zoo.expert_names)
            + f"; others on {'/'.join(standard)}), {len(zoo.seen_tasks)} seen + {len(zoo.unseen_tasks)} unseen "
            f"tasks; {size_mb:.1f} MB on disk."
        ),
        "build": args.build_note or "see the manifest for its settings",
        "n_validation": settings["validation_size"],
        "n_test": settings["test_size"],
        "candidates": pool.shape[0],
        "test_candidates": len(test_rows),
        "num_random": args.candidates,
        "test_random": len(correlation_rows),
        "keep": args.keep,
        "high": args.high,
        "random_seed": args.random_seed,
        "eval_seconds": eval_seconds,
        "machine": f"{torch.get_num_threads()} thread, torch {torch.__version__}",
    }
    out = Path(args.out)
    context["kept"] = _hand_written(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(result, context))
    raw = {"names": names, "coefficients": pool.tolist(), "tasks": [t.name for t in zoo.tasks],
           "validation": validation.tolist(), "test": test.tolist(), "analysis": result}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
