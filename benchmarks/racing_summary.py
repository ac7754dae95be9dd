"""Racing against the plain search: the table of benchmarks/results/racing.md from the two sweeps' rows.

    python -m benchmarks.racing_summary [--plain benchmarks/results/racing_plain] [--racing benchmarks/results/racing]

Reads both sweeps' rows.jsonl (`benchmarks/configs/racing_plain.yaml`, `racing.yaml`: the same cells with and
without racing, run side by side), pairs the cells by method, budget and seed, and prints a Markdown table: the
share of examples scored, the search's wall seconds, the test score (raw mean over the tasks) with its Welch
p-value against the plain search at the same budget, and at equal wall time (racing at the large budget against
plain at the small one), whether the picks were identical.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from benchmarks.sweep.report import mean_std, welch_p


def sweep_rows(folder: Path, setting: str | None = None, searches: bool = True) -> dict[tuple[str, str, int], dict]:
    """A sweep's rows (of `setting`, if given) by method, budget and seed: its searches', or else its static
    merges'."""
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines() if line.strip()]
    return {(r["method"], r["budget"], r["seed"]): r for r in rows
            if bool(r.get("evaluations")) == searches and setting in (None, r["setting"])}


def p_text(a: list[float], b: list[float]) -> str:
    """Welch's p-value as table text ("1 (identical)" for identical constant samples, "n/a" when undefined)."""
    if len(a) >= 2 and len(b) >= 2 and statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return "n/a" if a != b else "1 (identical)"
    p = welch_p(a, b)
    return "n/a" if math.isnan(p) else f"{p:.3g}"


def summary(plain_dir: Path, racing_dir: Path) -> str:
    plain, racing = sweep_rows(plain_dir), sweep_rows(racing_dir)
    keys = sorted(set(plain) & set(racing))
    groups = sorted({(m, b) for m, b, _ in keys}, key=lambda mb: (mb[0], mb[1] != "paper"))
    lines = [
        "| search | budget | seeds | examples scored | search s, plain | search s, racing | test, plain | test, racing "
        "| p | same pick |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, budget in groups:
        seeds = [s for m, b, s in keys if (m, b) == (method, budget)]
        pr = [plain[(method, budget, s)] for s in seeds]
        rr = [racing[(method, budget, s)] for s in seeds]
        same = sum(p["coefficients"] == r["coefficients"] for p, r in zip(pr, rr))
        lines.append(
            f"| {method} | {budget} | {len(seeds)} | {statistics.mean(r['examples_fraction'] for r in rr):.0%} "
            f"| {statistics.mean(p['search_seconds'] for p in pr):.0f} "
            f"| {statistics.mean(r['search_seconds'] for r in rr):.0f} "
            f"| {mean_std([p['test'] for p in pr])} | {mean_std([r['test'] for r in rr])} "
            f"| {p_text([p['test'] for p in pr], [r['test'] for r in rr])} | {same}/{len(seeds)} |")
    lines += ["", "Equal wall time: racing at 256 evaluations against plain at 128.", "",
              "| search | seeds | search s, plain 128 | search s, racing 256 | test, plain 128 | test, racing 256 | p |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for method in sorted({m for m, _, _ in keys}):
        seeds = [s for m, b, s in keys if m == method and b == "large" and (m, "paper", s) in plain]
        if not seeds:
            continue
        pr = [plain[(method, "paper", s)] for s in seeds]
        rr = [racing[(method, "large", s)] for s in seeds]
        lines.append(
            f"| {method} | {len(seeds)} | {statistics.mean(p['search_seconds'] for p in pr):.0f} "
            f"| {statistics.mean(r['search_seconds'] for r in rr):.0f} | {mean_std([p['test'] for p in pr])} "
            f"| {mean_std([r['test'] for r in rr])} | {p_text([p['test'] for p in pr], [r['test'] for r in rr])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plain", type=Path, default=Path("benchmarks/results/racing_plain"))
    parser.add_argument("--racing", type=Path, default=Path("benchmarks/results/racing"))
    args = parser.parse_args()
    print(summary(args.plain, args.racing))


if __name__ == "__main__":
    main()
