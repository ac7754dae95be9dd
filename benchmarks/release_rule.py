"""Would a stricter release rule have released better merges? Measured on the finished sweeps, on test.

    python -m benchmarks.release_rule benchmarks/results/search_quality benchmarks/results/sweep_smollm2 ...

A search run releases the best, on the selection part, of its pick and the static merges (the sweeps' ``(product)``
rows; `evox_merge.run.selection.select_release`). The rule ``significant`` (`evox_merge.run.selection.release_by_rule`)
releases a searched winner only when its selection margin over the best static merge is distinguishable from
resampling noise (`selection_margin`: the 95% paired bootstrap interval lies above 0), and the best static merge
otherwise. The rule was fixed before this measurement (the conventional 95% interval, no threshold tuned here).

For every search row of each sweep whose pick won the contest, this script rebuilds the row's selection part
(`benchmarks.sweep.cells._problems`, the same split, normalisation and search space), re-tunes the winning static
merge on the search part exactly as the sweep did, scores both with per-example parts (checked: the margin must
equal the sweep rows' selection fitness difference where both rows scored on this device; rows scored on a GPU are
re-scored here, and both margins are kept) and applies the rule. Both merges' test scores come from the sweep's rows, so
the table compares, run by run, what each rule would have released. Writes ``benchmarks/results/release_rule.md``
and one JSON line per contested run to ``benchmarks/results/release_rule/rows.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from scipy import stats

from benchmarks.sweep import cells
from benchmarks.sweep.config import load_sweep_config
from benchmarks.sweep.report import PRODUCT, mean_std, product_rows
from benchmarks.sweep.runner import ROWS_NAME, _finished
from evox_merge.problems.static_merges import StaticMerge
from evox_merge.problems.static_names import RANDOM_STATIC_MERGES
from evox_merge.run.selection import Candidate, release_by_rule, selection_margin, static_candidates
from evox_merge.util.machine import machine_markdown

OUT = Path("benchmarks/results/release_rule")
TOLERANCE = 1e-6  # re-tuned static merge and re-scored pick against the sweep row's selection fitness


def _sweep(sweep_dir: Path):
    """A finished sweep's config, rows, the static merges its contests use, and its product rows."""
    config = load_sweep_config(sweep_dir / "config.yaml")
    rows = list(_finished(sweep_dir / ROWS_NAME).values())
    statics = [m for m in config.product_statics if m in config.methods]
    return config, rows, statics, product_rows(rows, statics)


def contested_runs(sweep_dir: Path, progress: bool = True) -> list[dict]:
    """One dict per search run of the sweep whose pick won the selection contest: the margin, and both merges'
    test scores (from the sweep's rows)."""
    config, rows, statics, products = _sweep(sweep_dir)
    searches = {(r["setting"], tuple(r["tasks"]), r["method"], r["seed"], r["budget"]): r
                for r in rows if r["evaluations"] is not None}
    setup = cells._cached_setup(config.setup.model_dump_json())
    cells._NORMALISATIONS.clear()  # anchored per sweep (its split sizes), never shared between sweeps
    tuned: dict[tuple, Candidate] = {}
    out = []
    for product in products:
        key = (product["setting"], tuple(product["tasks"]), product["method"].removesuffix(PRODUCT), product["seed"],
               product["budget"])
        row = searches[key]
        if product["winner"] != row["method"]:
            continue  # a static merge won the contest: every rule releases it
        rival_row = max((r for r in rows if r["evaluations"] is None and r["method"] in statics
                         and r["tasks"] == row["tasks"] and r.get("selection") is not None
                         and (r["method"] not in RANDOM_STATIC_MERGES or r["seed"] == row["seed"])), key=lambda r: r["selection"])
        search_problem, selection, _ = cells._problems(setup, config, tuple(row["tasks"]), row["seed"])
        rival_key = (tuple(row["tasks"]), rival_row["method"], rival_row["seed"], row["seed"])
        if rival_key not in tuned:
            tuned[rival_key] = static_candidates(search_problem, [rival_row["method"]], seed=rival_row["seed"])[0]
        rival = tuned[rival_key]
        space = None if search_problem.space.kind == "expert" else search_problem.space
        pick = Candidate(row["pick"], "searched", StaticMerge(row["pick"], {}, coefficients=torch.tensor(
            row["coefficients"]), space=space), row["validation"])
        started = time.perf_counter()
        margin = selection_margin(pick, rival, selection, seed=row["seed"])
        released = release_by_rule("significant", pick, rival, margin)
        expected = row["selection"] - rival_row["selection"]
        same_device = {row.get("device"), rival_row.get("device")} <= {None, config.setup.device}
        if margin["margin"] is None or (same_device and abs(margin["margin"] - expected) > TOLERANCE):
            raise RuntimeError(f"{sweep_dir}: {key}: re-scored margin {margin['margin']} differs from the sweep "
                               f"rows' {expected} (pick {row['selection']}, {rival_row['method']} "
                               f"{rival_row['selection']}): the rebuild is not the sweep's selection part")
        out.append({"sweep": sweep_dir.name, "setting": row["setting"], "tasks": row["tasks"],
                    "method": row["method"], "seed": row["seed"], "budget": row["budget"], "pick": row["pick"],
                    "rival": rival_row["method"], "margin": margin, "rule_released": released.kind,
                    "test_pick": row["test"], "test_rival": rival_row["test"], "sweep_margin": expected,
                    "seconds": time.perf_counter() - started})
        if progress:
            print(f"{sweep_dir.name} {row['setting']} {'+'.join(row['tasks'])[:30]} {row['method']} "
                  f"seed {row['seed']} {row['budget']}: margin {margin['margin']:+.4f} "
                  f"ci {margin['ci95'][0]:+.4f}..{margin['ci95'][1]:+.4f} -> {released.kind}", flush=True)
    return out


def paired_p(first: list[float], second: list[float]) -> float:
    """Paired t-test over seeds (NaN when the rules released the same merges on every seed, or one seed)."""
    differences = [a - b for a, b in zip(first, second)]
    if len(differences) < 2 or not any(differences):
        return math.nan
    return float(stats.ttest_rel(first, second).pvalue)


def _summary(contested: list[dict], products: dict[tuple, list[dict]]) -> list[str]:
    """Markdown rows: per sweep, setting, budget and method, the release's test under each rule."""
    lines = ["| sweep | setting | budget | method | runs | pick won contest | rule kept pick | test, rule `best` "
             "(today) | test, rule `significant` | p (paired runs) | overrides that gained / lost on test |",
             "|" + " --- |" * 11]
    by_run = {(c["sweep"], c["setting"], tuple(c["tasks"]), c["method"], c["seed"], c["budget"]): c
              for c in contested}
    for (sweep, setting, budget, method), runs in sorted(products.items()):
        gained, lost, kept, won = 0, 0, 0, 0
        per_seed_best, per_seed_strict = defaultdict(list), defaultdict(list)
        for product in runs:
            c = by_run.get((sweep, setting, tuple(product["tasks"]), method, product["seed"], budget))
            test_best = product["test"]
            test_strict = test_best
            if c is not None:
                won += 1
                if c["rule_released"] == "searched":
                    kept += 1
                else:
                    test_strict = c["test_rival"]
                    gained += test_strict > test_best
                    lost += test_strict < test_best
            per_seed_best[product["seed"]].append(test_best)
            per_seed_strict[product["seed"]].append(test_strict)
        seeds_best = [statistics.mean(v) for v in per_seed_best.values()]
        seeds_strict = [statistics.mean(v) for v in per_seed_strict.values()]
        p = paired_p(seeds_best, seeds_strict)
        lines.append(f"| {sweep} | {setting} | {budget} | {method} | {len(runs)} | {won} | {kept} | "
                     f"{mean_std(seeds_best)} | {mean_std(seeds_strict)} | "
                     f"{'' if math.isnan(p) else f'{p:.3g}'} | {gained} / {lost} |")
    return lines


def _overrides_line(contested: list[dict], runs: int, label: str, mean_change: bool = True) -> str:
    """One row of the per-sweep table: how often the rule overrode the contest and what that did to test (no mean
    change across sweeps: their test scores are on different scales)."""
    overrides = [c for c in contested if c["rule_released"] == "static"]
    changes = [c["test_rival"] - c["test_pick"] for c in overrides]
    mean = f"{statistics.mean(changes):+.4f}" if changes and mean_change else ""
    return (f"| {label} | {runs} | {len(contested)} | {len(overrides)} | {mean} | {sum(d > 0 for d in changes)} / "
            f"{sum(d < 0 for d in changes)} / {sum(d == 0 for d in changes)} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", help="sweep output folders (each with config.yaml and rows.jsonl)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from the rows this script wrote before (no scoring)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    products = defaultdict(list)
    if args.report_only:
        contested = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines() if line.strip()]
        seconds = json.loads((out / "run.json").read_text())["seconds"]
    else:
        contested = [c for sweep in map(Path, args.sweeps) for c in contested_runs(sweep)]
        seconds = time.perf_counter() - started
        (out / "rows.jsonl").write_text("".join(json.dumps(c) + "\n" for c in contested))
        (out / "run.json").write_text(json.dumps({"sweeps": args.sweeps, "seconds": seconds}))
    for sweep in map(Path, args.sweeps):
        for product in _sweep(sweep)[3]:
            products[(sweep.name, product["setting"], product["budget"],
                      product["method"].removesuffix(PRODUCT))].append(product)
    by_sweep = [_overrides_line([c for c in contested if c["sweep"] == sweep.name],
                                sum(len(runs) for key, runs in products.items() if key[0] == sweep.name), sweep.name)
                for sweep in map(Path, args.sweeps)]
    total = _overrides_line(contested, sum(map(len, products.values())), "**all**", mean_change=False)
    text = "\n".join([
        "# The release rule: best on the selection part, or only when the margin is distinguishable",
        "",
        f"`python -m benchmarks.release_rule {' '.join(args.sweeps)}` ({seconds:.0f} s of scoring, one thread).",
        "Rows: `release_rule/rows.jsonl` (one per run whose searched pick won the contest, with its margin); "
        "`--report-only` rewrites this file from them.",
        "",
        __doc__.split("\n\n", 2)[2].split("Writes")[0].strip(),
        "",
        "| sweep | search runs | pick won the contest | rule `significant` released the static merge instead | "
        "mean test change of those | gained / lost / equal on test |",
        "| --- | --- | --- | --- | --- | --- |",
        *by_sweep,
        total,
        "",
        "Per search: the sweeps' raw test mean of the merge each rule releases; mean ± std over seeds (single-task "
        "settings: averaged over tasks per seed first); p: paired t-test over the seed means (same seeds, two rules).",
        "",
        *_summary(contested, products),
        "",
        "Machine:",
        machine_markdown(),
        "",
    ])
    (out.parent / "release_rule.md").write_text(text)
    print(total)


if __name__ == "__main__":
    main()
