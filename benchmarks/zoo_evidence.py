"""Evidence that an offline zoo is a real merging problem: writes ``benchmarks/results/zoo.md`` (``tiny``) or
``benchmarks/results/zoo_<preset>.md`` (other presets), and the raw scores next to it as JSON.

Every score comes from `MergeProblem` (the scorer every search uses), on each task's validation and test splits:
the base, each expert alone, the uniform average of all experts (model soup), task arithmetic, TIES and DARE with
their scaling tuned on validation (per task), and the best of `--candidates` random coefficient vectors chosen on
validation (per task). It checks the three claims of the zoo's issue and reports the validation-vs-test correlation
of candidate scores.

The run is resumable: every candidate's scores go to a cache file (``--cache``) as soon as they are computed, the
report is rewritten after every chunk (marked PARTIAL until everything is scored), and a rerun with the same
arguments skips what the cache holds. The most informative candidates come first: the static merges on
validation, then on test, then the random vectors.

    python benchmarks/zoo_evidence.py                       # builds (or reuses) the cached tiny zoo
    python benchmarks/zoo_evidence.py --zoo DIR --out benchmarks/results/zoo.md
    python benchmarks/zoo_evidence.py --preset smollm2 --candidates 64 --test-random 8 --ta-scales 0.25,0.5,0.75,1,1.25
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from evox_merge.experts import ExpertSet
from evox_merge.problems import MergeProblem
from evox_merge.problems import static_merges
from evox_merge.util.report_text import hand_written, keep_marker
from evox_merge.zoo import build_zoo, default_zoo_dir, load_zoo

TA_SCALES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CLEAR_MARGIN = 0.10  # an expert "clearly" beats the base on its own task by at least this much (test)
NLL_MARGIN = 0.02  # the same for a language-modelling task, in nats per token of minus the mean NLL
DENSE_MERGES = {"ties": ("ties", 0.2), "dare": ("dare_ties", 0.5)}  # method and density, as in STATIC_MERGES
DENSE_SCALES = (0.5, 1.0, 1.5)


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
    num_experts: int, num_random: int, seed: int, keep: float, high: float, ta_scales=TA_SCALES
) -> tuple[list[str], torch.Tensor]:
    """Names and ``(C, N)`` coefficients: base, each expert, uniform average, task arithmetic grid, random."""
    eye = torch.eye(num_experts)
    names = ["base", *[f"expert{i}" for i in range(num_experts)], "uniform"]
    rows = [torch.zeros(num_experts), *eye, torch.full((num_experts,), 1.0 / num_experts)]
    for scale in ta_scales:
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


def _pick(rows: list[int], validation: torch.Tensor, k: int) -> int | None:
    """The row of `rows` with the best finite validation score on task `k` (the first among ties), or None."""
    finite = [r for r in rows if not math.isnan(validation[r, k].item())]
    if not finite:
        return None
    return finite[int(torch.argmax(validation[finite, k]))]


def picks(names: list[str], validation: torch.Tensor, prefix: str) -> list[int | None]:
    """Per task, the candidate named ``<prefix>...`` with the best validation score (None if none is scored yet)."""
    rows = [i for i, name in enumerate(names) if name.startswith(prefix)]
    return [_pick(rows, validation, k) for k in range(validation.shape[1])]


def random_search_picks(names: list[str], validation: torch.Tensor) -> list[int | None]:
    """Per task, the random candidate with the best validation score (the first among ties)."""
    return picks(names, validation, "random")


def _pair(validation: torch.Tensor, test: torch.Tensor, row: int | None, k: int) -> list[float]:
    return [math.nan, math.nan] if row is None else [validation[row, k].item(), test[row, k].item()]


def _above(value: float, *others: float) -> bool | None:
    """value > every one of `others`; None if any of them is not scored yet."""
    if any(math.isnan(v) for v in (value, *others)):
        return None
    return all(value > other for other in others)


MERGES = ("uniform", "task_arithmetic", "ties", "dare", "random_search")


def analyse(names: list[str], validation: torch.Tensor, test: torch.Tensor, zoo, correlation_rows: list[int]) -> dict:
    """Per task: the baselines' validation/test scores, the picks tuned on validation, and the checks (None where
    a score they need is missing); validation-vs-test correlations over the candidates `correlation_rows` scored on
    both splits (over every candidate scored on both if fewer than 3 of those are)."""
    index = {name: i for i, name in enumerate(names)}
    experts = zoo.expert_names
    tuned = {"task_arithmetic": picks(names, validation, "ta"), "ties": picks(names, validation, "ties"),
             "dare": picks(names, validation, "dare"), "random_search": random_search_picks(names, validation)}
    both = ~(validation.isnan() | test.isnan())  # (C, K)
    tasks = {}
    for k, spec in enumerate(zoo.tasks):
        group = zoo.manifest["tasks"][spec.name]["group"]
        row = {
            "group": group,
            "type": spec.type,
            "families": zoo.task_families(spec.name),
            "base": _pair(validation, test, 0, k),
            "experts": {e: _pair(validation, test, 1 + i, k) for i, e in enumerate(experts)},
            "uniform": _pair(validation, test, index["uniform"], k),
        }
        for merge, chosen in tuned.items():
            row[merge] = _pair(validation, test, chosen[k], k)
            row[f"{merge}_pick"] = names[chosen[k]] if chosen[k] is not None else None
        row["task_arithmetic_scale"] = float(row["task_arithmetic_pick"][2:]) if row["task_arithmetic_pick"] else None
        rows = [r for r in correlation_rows if both[r, k]]
        if len(rows) < 3:
            rows = [r for r in range(len(names)) if both[r, k]]
        row["val_test_correlation"] = pearson(validation[rows, k], test[rows, k]) if len(rows) >= 3 else math.nan
        row["val_test_correlation_n"] = len(rows)
        expert_tests = {e: row["experts"][e][1] for e in experts}
        scored = {e: v for e, v in expert_tests.items() if not math.isnan(v)}
        row["best_single_expert"] = max(scored, key=scored.get) if len(scored) == len(experts) else None
        if group == "seen":
            margin = NLL_MARGIN if spec.type == "language_modeling" else CLEAR_MARGIN
            row["margin_over_base"] = row["experts"][spec.name][1] - row["base"][1]
            row["required_margin"] = margin
            row["check"] = None if math.isnan(row["margin_over_base"]) else row["margin_over_base"] >= margin
        else:
            best = row["experts"][row["best_single_expert"]][1] if row["best_single_expert"] else math.nan
            row["merges_beating_base_and_best_expert"] = [
                m for m in MERGES if _above(row[m][1], row["base"][1], best)]
            verdicts = [_above(row[m][1], row["base"][1], best) for m in MERGES]
            row["check"] = True if any(verdicts) else (None if None in verdicts else False)
        tasks[spec.name] = row
    pooled_rows = [r for r in correlation_rows if both[r].all()]
    if len(pooled_rows) < 3:
        pooled_rows = [r for r in range(len(names)) if both[r].all()]
    pooled = (pearson(validation[pooled_rows].flatten(), test[pooled_rows].flatten())
              if len(pooled_rows) >= 3 else math.nan)
    return {"tasks": tasks, "pooled_val_test_correlation": pooled, "pooled_val_test_correlation_n": len(pooled_rows)}


def _f(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def _yes(check: bool | None) -> str:
    return "n/a" if check is None else ("yes" if check else "no")


def render(result: dict, context: dict) -> str:
    """The Markdown report."""
    tasks = result["tasks"]
    experts = context["experts"]
    seen = [n for n, t in tasks.items() if t["group"] == "seen"]
    unseen = [n for n, t in tasks.items() if t["group"] == "unseen"]
    seen_ok = sum(tasks[n]["check"] is True for n in seen)
    seen_known = sum(tasks[n]["check"] is not None for n in seen)
    unseen_ok = sum(tasks[n]["check"] is True for n in unseen)
    unseen_known = sum(tasks[n]["check"] is not None for n in unseen)
    title = ("# The offline zoo is a real merging problem" if context["preset"] == "tiny"
             else f"# The `{context['preset']}` zoo is a real merging problem")
    lines = [title, ""]
    if context["partial"]:
        lines += [
            f"> **PARTIAL RESULTS** ({context['progress']}). Every number below is final for the candidates scored so "
            "far; `n/a` marks what is not scored yet, and a check that needs it is `n/a` too. Resume with the same "
            f"command: `{context['command']}`.",
            "",
        ]
    lines += [
        f"Generated by `{context['command']}` on the `{context['preset']}` zoo (seed {context['seed']}); "
        "every score is `MergeProblem.evaluate_per_task` (exact match after whitespace normalisation for "
        "generation, argmax summed log-likelihood for multiple choice, minus the mean per-token NLL for language "
        "modelling).",
        "",
        f"- Zoo: {context['zoo_summary']}",
        f"- Build: {context['build']}",
        f"- Splits: validation {context['n_validation']} / test {context['n_test']} examples per task. "
        f"Evidence run: {context['scored_validation']} candidates scored on validation and {context['scored_test']} "
        f"on test, x {len(tasks)} tasks, in {context['eval_seconds'] / 60:.0f} min of scoring ({context['machine']}).",
        f"- Random search: {context['num_random']} vectors, each coefficient uniform in [0, {context['high']:g}] "
        f"with probability {context['keep']:g} and 0 otherwise (seed {context['random_seed']}); the vector with the "
        "best **validation** score on a task is its pick, and its test score is reported. Task arithmetic: all "
        f"coefficients equal to a scale in {{{', '.join(f'{s:g}' for s in context['ta_scales'])}}}; TIES (density "
        f"{DENSE_MERGES['ties'][1]:g}) and DARE (DARE-TIES, density {DENSE_MERGES['dare'][1]:g}, drop masks from seed "
        f"{context['random_seed']}) over the dense task vectors with every expert weighted by a scale in "
        f"{{{', '.join(f'{s:g}' for s in context['dense_scales'])}}} (`evox_merge.problems.static_merges`); each "
        "scale chosen on validation per task. Uniform (model soup): all coefficients 1/N.",
        "",
        "## Checks",
        "",
        f"1. Every expert beats the base on its own seen task by at least {CLEAR_MARGIN:.2f} accuracy (or "
        f"{NLL_MARGIN:g} nats/token for language modelling) on test: **{seen_ok}/{len(seen)}**"
        + (f" ({len(seen) - seen_known} not scored yet)" if seen_known < len(seen) else "")
        + (" - pass." if seen_ok == len(seen) else " - FAIL." if seen_known == len(seen) else "."),
        f"2. On unseen tasks, some merge chosen on validation (uniform, task arithmetic, TIES, DARE or random search) "
        f"beats both the base and the best single expert (the expert with the highest *test* score, a strict "
        f"baseline) on test: **{unseen_ok}/{len(unseen)}**"
        + (f" ({len(unseen) - unseen_known} not decided yet)" if unseen_known < len(unseen) else "")
        + (" - pass (at least half)." if 2 * unseen_ok >= len(unseen) else
           " - FAIL (fewer than half)." if unseen_known == len(unseen) else "."),
        f"3. Validation-vs-test Pearson correlation of candidate scores ({context['correlation_note']}): pooled over "
        f"tasks **{_f(result['pooled_val_test_correlation'])}** (over {result['pooled_val_test_correlation_n']} "
        f"candidates); per task in the last column below (median "
        f"{_f(_median([t['val_test_correlation'] for t in tasks.values()]))}).",
        "",
        "## Summary (test)",
        "",
        "| task | group | type | base | own / best expert | uniform | task arith. (scale) | TIES | DARE | "
        "random search | check | val-test r |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    kinds = {"multiple_choice": "MC", "generation": "gen", "language_modeling": "LM"}
    for name, t in tasks.items():
        if t["group"] == "seen":
            expert_cell = f"{_f(t['experts'][name][1])} (own)"
        else:
            best = t["best_single_expert"]
            expert_cell = f"{_f(t['experts'][best][1])} ({best})" if best else "n/a"
        scale = t["task_arithmetic_scale"]
        lines.append(
            f"| {name} | {t['group']} | {kinds[t['type']]} | {_f(t['base'][1])} | {expert_cell} | "
            f"{_f(t['uniform'][1])} | {_f(t['task_arithmetic'][1])} ({'n/a' if scale is None else f'{scale:g}'}) | "
            f"{_f(t['ties'][1])} | {_f(t['dare'][1])} | {_f(t['random_search'][1])} | {_yes(t['check'])} | "
            f"{_f(t['val_test_correlation'])} |"
        )
    lines += [
        "",
        "## Every score (validation / test)",
        "",
        "| task | base | " + " | ".join(experts) + " | uniform | task arith. | TIES | DARE | random search |",
        "|---|" + "---|" * (len(experts) + 6),
    ]
    for name, t in tasks.items():
        cells = [t["base"], *[t["experts"][e] for e in experts], t["uniform"], t["task_arithmetic"], t["ties"],
                 t["dare"], t["random_search"]]
        lines.append(f"| {name} | " + " | ".join(f"{_f(v)} / {_f(s)}" for v, s in cells) + " |")
    lines += ["", keep_marker("zoo_evidence.py"), context["kept"]]
    return "\n".join(lines)


def _expert_shape(name: str, shape: dict, standard: tuple[str, ...]) -> str:
    targets = tuple(shape["target_modules"])
    return f"{name} r{shape['rank']}" + ("" if targets == standard else f" on {'/'.join(targets)}")


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if not math.isnan(v))
    return finite[len(finite) // 2] if finite else math.nan


class ScoreCache:
    """Per-candidate scores on disk (JSON lines), so that an interrupted run resumes where it stopped.

    The first line fingerprints the zoo (its manifest) and the candidate pool; a cache of another zoo or pool is
    set aside (renamed ``*.stale``) rather than mixed in."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.scores: dict[tuple[str, str], list[float]] = {}
        self.seconds = 0.0  # scoring time of every cached candidate, across runs
        if path.is_file():
            lines = path.read_text().splitlines()
            header = json.loads(lines[0]) if lines else {}
            if header.get("fingerprint") == fingerprint:
                for line in lines[1:]:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill
                        continue
                    self.scores[(entry["split"], entry["name"])] = entry["scores"]
                    self.seconds += entry.get("seconds", 0.0)
                return
            os.replace(path, path.with_name(path.name + ".stale"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")

    def add(self, split: str, name: str, scores: list[float], seconds: float) -> None:
        self.scores[(split, name)] = scores
        self.seconds += seconds
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"split": split, "name": name, "scores": scores, "seconds": round(seconds, 3)})
                         + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def dense_deltas(problem: MergeProblem, name: str, seed: int) -> dict[str, torch.Tensor]:
    """The merged deltas of the dense candidate `name` (``ties<scale>`` or ``dare<scale>``), exactly as
    `static_merges.dense_merge` builds them (DARE's drop masks from `seed`)."""
    kind = "ties" if name.startswith("ties") else "dare"
    method, density = DENSE_MERGES[kind]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return static_merges.operator_deltas(problem, method, float(name[len(kind):]), density)


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
    parser.add_argument("--ta-scales", default=",".join(f"{s:g}" for s in TA_SCALES),
                        help="task arithmetic scales, comma-separated")
    parser.add_argument("--dense-scales", default=",".join(f"{s:g}" for s in DENSE_SCALES),
                        help="TIES and DARE scales, comma-separated")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", help="report (default: benchmarks/results/zoo.md for tiny, zoo_<preset>.md else)")
    parser.add_argument("--cache", help="resumable score cache (default: next to the zoo's cache, "
                                        "$EVOX_MERGE_CACHE/evidence/<preset>-seed<seed>.jsonl)")
    parser.add_argument("--build-note", default="", help="build time and size, as measured")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ta_scales = tuple(float(s) for s in args.ta_scales.split(","))
    dense_scales = tuple(float(s) for s in args.dense_scales.split(","))
    results = Path(__file__).parent / "results"
    out = Path(args.out) if args.out else results / ("zoo.md" if args.preset == "tiny" else f"zoo_{args.preset}.md")

    zoo = load_zoo(args.zoo or build_zoo(preset=args.preset, seed=args.seed))
    experts = ExpertSet.load(zoo.base_dir, zoo.adapter_dirs)
    problems = {
        "validation": MergeProblem(experts, zoo.tasks, batch_size=args.batch_size),
        "test": MergeProblem(experts, [spec.with_split("test") for spec in zoo.tasks], batch_size=args.batch_size),
    }
    names, pool = candidate_pool(experts.num_experts, args.candidates, args.random_seed, args.keep, args.high,
                                 ta_scales)
    num_linear = len(names)
    names += [f"{kind}{scale:g}" for kind in DENSE_MERGES for scale in dense_scales]
    fingerprint = hashlib.sha256(
        ((zoo.root / "manifest.json").read_bytes() + json.dumps([names, pool.tolist(), args.batch_size]).encode())
    ).hexdigest()
    cache_path = Path(args.cache) if args.cache else (
        default_zoo_dir(zoo.preset, zoo.seed).parent.parent / "evidence" / f"{zoo.preset}-seed{zoo.seed}.jsonl")
    cache = ScoreCache(cache_path, fingerprint)
    index = {name: i for i, name in enumerate(names)}
    num_tasks = len(zoo.tasks)
    matrices = {split: torch.full((len(names), num_tasks), math.nan, dtype=torch.float64) for split in problems}
    for (split, name), scores in cache.scores.items():
        if name in index:
            matrices[split][index[name]] = torch.tensor(scores, dtype=torch.float64)
    random_rows = [i for i, name in enumerate(names) if name.startswith("random")]
    fixed_rows = [i for i in range(num_linear) if i not in random_rows]
    dense_rows = list(range(num_linear, len(names)))
    correlation_rows = random_rows[: args.test_random]
    command = "python benchmarks/zoo_evidence.py " + _shown_arguments(argv if argv is not None else os.sys.argv[1:])

    def report(partial: bool) -> None:
        validation, test = matrices["validation"], matrices["test"]
        result = analyse(names, validation, test, zoo, correlation_rows)
        done_v = int((~validation.isnan().any(dim=1)).sum())
        done_t = int((~test.isnan().any(dim=1)).sum())
        context = _context(zoo, experts, args, names, pool, done_v, done_t, cache.seconds, ta_scales,
                           dense_scales, correlation_rows)
        context.update(partial=partial, command=command, kept=hand_written(out, "zoo_evidence.py"),
                       progress=f"{done_v}/{len(names)} candidates on validation, {done_t} on test so far; the run "
                                f"scores {len(names)} on validation and about {len(test_plan(validation))} on test")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(result, context))
        raw = {"partial": partial, "names": names,
               "coefficients": pool.tolist() + [None] * len(dense_rows), "tasks": [t.name for t in zoo.tasks],
               "validation": validation.tolist(), "test": test.tolist(), "analysis": result, "command": command}
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1))

    def test_plan(validation: torch.Tensor) -> list[int]:
        chosen = {0, *range(1, 1 + experts.num_experts), index["uniform"], *correlation_rows}
        for prefix in ("ta", "ties", "dare", "random"):
            chosen |= {r for r in picks(names, validation, prefix) if r is not None}
        return sorted(chosen)

    def score(split: str, rows: list[int], description: str) -> None:
        todo = [r for r in rows if (split, names[r]) not in cache.scores]
        linear = [r for r in todo if r < num_linear]
        for start in tqdm(range(0, len(todo), 1), desc=f"{description} ({len(todo)} to score)", unit="candidate"):
            r = todo[start]
            begin = time.perf_counter()
            if r in linear:
                values = problems[split].evaluate_per_task(pool[r : r + 1])[0]
            else:
                values = problems[split].evaluate_deltas(dense_deltas(problems[split], names[r], args.random_seed))
            matrices[split][r] = values
            cache.add(split, names[r], values.tolist(), time.perf_counter() - begin)
            report(partial=True)

    score("validation", fixed_rows + dense_rows, "validation: static merges")
    score("test", [r for r in test_plan(matrices["validation"]) if r not in random_rows], "test: static merges")
    score("validation", random_rows, "validation: random vectors")
    score("test", test_plan(matrices["validation"]), "test: random picks and correlation rows")
    report(partial=False)
    print(f"wrote {out} and {out.with_suffix('.json')}")


def _shown_arguments(argv: list[str]) -> str:
    """The command-line arguments as a shell would need them, the (long) build note elided."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            shown.append('"..."')
            skip = False
        elif arg == "--build-note":
            shown.append(arg)
            skip = True
        elif arg.startswith("--build-note="):
            shown.append('--build-note="..."')
        else:
            shown.append(shlex.quote(arg))
    return " ".join(shown)


def _context(zoo, experts, args, names, pool, done_validation, done_test, eval_seconds, ta_scales, dense_scales,
             correlation_rows) -> dict:
    settings = zoo.manifest["settings"]
    size_mb = sum(p.stat().st_size for p in zoo.root.rglob("*") if p.is_file()) / 1e6
    n_params = sum(p.numel() for p in experts.model.parameters())
    config = json.loads((zoo.base_dir / "config.json").read_text())
    base_name = zoo.manifest.get("base_model", {}).get("name") or config.get("model_type", "").capitalize()
    tasks = f"{len(zoo.seen_tasks)} seen + {len(zoo.unseen_tasks)} unseen tasks; {size_mb:.1f} MB on disk."
    if experts.dense:  # fully fine-tuned experts (the t5 preset)
        layers = config.get("num_hidden_layers") or config.get("num_layers")
        summary = (f"{base_name} base ({config.get('model_type')}), hidden {config.get('hidden_size') or config.get('d_model')}, "
                   f"{layers} layers, {n_params / 1e6:.2f}M parameters, {len(zoo.expert_names)} dense (fully fine-tuned) "
                   f"experts; {tasks}")
    else:
        shapes = settings["experts"]
        standard = max((tuple(s["target_modules"]) for s in shapes.values()), key=list(
            tuple(s["target_modules"]) for s in shapes.values()).count)
        summary = (f"{base_name} base ({config.get('model_type')}), hidden {config.get('hidden_size')}, "
                   f"{config.get('num_hidden_layers')} layers, {n_params / 1e6:.2f}M parameters, "
                   f"{len(zoo.expert_names)} LoRA experts ("
                   + ", ".join(_expert_shape(e, shapes[e], standard) for e in zoo.expert_names)
                   + f"; others on {'/'.join(standard)}), {tasks}")
    return {
        "preset": zoo.preset,
        "seed": zoo.seed,
        "experts": zoo.expert_names,
        "zoo_summary": summary,
        "build": args.build_note or "see the manifest for its settings",
        "n_validation": settings["validation_size"],
        "n_test": settings["test_size"],
        "scored_validation": done_validation,
        "scored_test": done_test,
        "num_random": args.candidates,
        "keep": args.keep,
        "high": args.high,
        "random_seed": args.random_seed,
        "ta_scales": ta_scales,
        "dense_scales": dense_scales,
        "eval_seconds": eval_seconds,
        "correlation_note": (f"the first {len(correlation_rows)} random candidates, scored on both splits; every "
                             "candidate scored on both splits while fewer than 3 of those are"),
        "machine": f"{torch.get_num_threads()} thread, torch {torch.__version__}",
    }


if __name__ == "__main__":
    main()
