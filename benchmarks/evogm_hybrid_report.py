"""Tables of benchmarks/evogm_hybrid.py's runs.jsonl: the knob pilot (search and selection parts only), then EvoGM
then CMA-ES against CMA-ES and EvoGM (default) at 64, 128 and 256 evaluations, and the best-so-far curves."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.sweep.report import mean_std, welch_p
from evox_merge.util.machine import machine_markdown

MAIN = ("evogm_cmaes", "cmaes", "evogm")
CHECKPOINTS = (16, 32, 64, 128, 256)


def per_seed(rows: list[dict], key: str) -> dict[int, float]:
    """seed -> `key` averaged over the task groups of that seed (single-task: the tasks)."""
    values: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        values[row["seed"]].append(row[key])
    return {seed: statistics.fmean(v) for seed, v in sorted(values.items())}


def _cell(values: list[float]) -> str:
    return mean_std(values) if len(values) > 1 else f"{values[0]:.4f}"


def _p(first: list[float], second: list[float]) -> str:
    p = welch_p(first, second)
    return "" if p != p else f"{p:.3g}"


def pilot_table(rows: list[dict]) -> str:
    """Per knob value and budget: search-part and selection-part fitness of the pick (per-seed means over tasks)."""
    methods = sorted({r["method"] for r in rows if r["method"].startswith("evogm_cmaes_k")})
    if not methods:
        return "(no pilot runs)\n"
    lines = ["| method | budget | runs | search part (mean +- std) | selection part (mean +- std) |",
             "| --- | --- | --- | --- | --- |"]
    for budget in (64, 128, 256):
        for method in methods:
            chosen = [r for r in rows if r["method"] == method and r["budget"] == budget]
            search = list(per_seed(chosen, "validation").values())
            selection = list(per_seed(chosen, "selection").values())
            lines.append(f"| {method} | {budget} | {len(chosen)} | {_cell(search)} | {_cell(selection)} |")
    return "\n".join(lines) + "\n"


def main_table(rows: list[dict], setting: str, budget: int) -> str:
    """Per method: runs, search part, selection part, test (algorithm alone) and product test, p-values."""
    chosen = {m: [r for r in rows if r["setting"] == setting and r["budget"] == budget and r["method"] == m]
              for m in MAIN}
    columns = {m: {k: per_seed(chosen[m], k) for k in ("validation", "selection", "test", "product_test")}
               for m in MAIN}
    lines = ["| method | runs | search part | p vs evogm | p vs cmaes | selection part | p vs evogm | p vs cmaes "
             "| test | p vs evogm | p vs cmaes | test (product) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in MAIN:
        if not chosen[method]:
            continue
        cells = [method, str(len(chosen[method]))]
        for key in ("validation", "selection", "test"):
            mine = list(columns[method][key].values())
            cells.append(_cell(mine))
            for other in ("evogm", "cmaes"):
                cells.append("" if other == method or not chosen[other] else
                             _p(mine, list(columns[other][key].values())))
        cells.append(_cell(list(columns[method]["product_test"].values())))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curve_table(rows: list[dict], setting: str) -> str:
    """Mean best-so-far on the search part (normalised) after 16 ... 256 evaluations, over every run."""
    lines = ["| method | runs | " + " | ".join(f"after {c}" for c in CHECKPOINTS) + " |",
             "| --- | --- | " + " | ".join("---" for _ in CHECKPOINTS) + " |"]
    for method in MAIN:
        curves = [r["curve"] for r in rows if r["setting"] == setting and r["method"] == method and r["curve"]]
        if curves:
            means = [statistics.fmean(c[n - 1] for c in curves) for n in CHECKPOINTS]
            lines.append(f"| {method} | {len(curves)} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines) + "\n"


def landscape_table(path: Path) -> str:
    """Best fitness (maximum 0) on benchmarks/landscapes.py's `smooth` and `corners`, per method over seeds."""
    if not path.exists():
        return "(no landscape runs)\n"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    methods = ("evogm_cmaes", "cmaes", "evogm_default")
    lines = ["| landscape | method | runs | median best | mean best +- std | p vs evogm_cmaes |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in ("smooth", "corners"):
        best = {m: [r["best"] for r in rows if r["landscape"] == name and r["method"] == m] for m in methods}
        for method in methods:
            if best[method]:
                p = "" if method == "evogm_cmaes" else _p(best[method], best["evogm_cmaes"])
                lines.append(f"| {name} | {method} | {len(best[method])} | {statistics.median(best[method]):.4f} | "
                             f"{_cell(best[method])} | {p} |")
    return "\n".join(lines) + "\n"


def write_report(runs: Path, out: Path) -> None:
    """Write the tables (between the markers of `out`, keeping its hand-written text) from `runs`."""
    rows = [json.loads(line) for line in runs.read_text().splitlines() if line.strip()]
    pilot = [r for r in rows if r["method"].startswith("evogm_cmaes_k")]
    main = [r for r in rows if r["method"] in MAIN]
    parts = ["## Pilot: the switch point (search and selection parts only; seeds 10 and 11)\n",
             pilot_table(pilot)]
    for setting in sorted({r["setting"] for r in main}, reverse=True):
        tasks = sorted({t for r in main if r["setting"] == setting for t in r["tasks"]})
        seeds = sorted({r["seed"] for r in main if r["setting"] == setting})
        parts.append(f"## {setting} ({len(tasks)} task(s), seeds {seeds})\n")
        for budget in (64, 128, 256):
            parts += [f"### {budget} evaluations\n", main_table(main, setting, budget)]
        parts += ["### Best so far on the search part (normalised, mean over runs)\n", curve_table(main, setting)]
    parts += ["## Synthetic landscapes (benchmarks/landscapes.py: N = 8, P = 16, 128 evaluations, default starts)\n",
              landscape_table(runs.parent / "landscapes.jsonl")]
    parts += ["## Machine\n", machine_markdown()]
    generated = "\n".join(parts)
    begin, end = "<!-- tables: begin -->", "<!-- tables: end -->"
    text = out.read_text() if out.exists() else f"# EvoGM then CMA-ES\n\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    out.write_text(f"{head}{begin}\n{generated}\n{end}{tail}")
