"""The learning curve (issue 29, point 6): how a search's test gain over tuned task arithmetic grows with the number
of search examples per task, on the tiny zoo.

Each point is a sweep with one ``max_validation_examples`` (benchmarks/configs/learning_curve_n*.yaml; the
32-example point is swarms_tiny.yaml's rows, run with the same protocol, restricted to the same tasks and methods).
Per size, per method and seed: the mean over the tasks of (test score - task arithmetic's test score on that task);
p: a one-sample t-test of the per-seed gains against 0 (task arithmetic is deterministic: one row per task), and
Welch's t-test of EvoGM's per-seed gains against CMA-ES's. The validation-to-test gap: the search-part fitness of
the pick (normalised: 0 = base, 1 = best single expert) minus its normalised test score, mean over runs.

Run (after the sweeps): python -m benchmarks.learning_curve  -> benchmarks/results/learning_curve.md and .png
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.sweep.report import PRODUCT, product_rows, welch_p  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SOURCES = {8: RESULTS / "learning_curve/n8/rows.jsonl", 16: RESULTS / "learning_curve/n16/rows.jsonl",
           32: RESULTS / "swarms/rows.jsonl", 64: RESULTS / "learning_curve/n64/rows.jsonl"}
TASKS = ("mix_reverse_sort", "mix_next_double", "mix_skip_rotate", "mix_digit_sum_length", "mix_all")
STATICS = ("base", "best_single", "model_soup", "task_arithmetic")
SEARCHES = ("cmaes", "evogm")
PRODUCT_STATICS = ["task_arithmetic", "model_soup", "best_single"]
SHOWN = ("cmaes", "evogm", "cmaes" + PRODUCT, "evogm" + PRODUCT)


SETTINGS = ("single_task_unseen", "multi_task_unseen")


def load_rows(path: Path, setting: str) -> list[dict]:
    """The rows of `setting` (single tasks: those of `TASKS`) and the methods here, from one sweep's rows.jsonl."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["setting"] == setting and row["method"] in STATICS + SEARCHES
            and (setting != "single_task_unseen" or row["tasks"][0] in TASKS)]


def group(row: dict) -> str:
    return "+".join(row["tasks"])


def one_sample_p(values: list[float]) -> float:
    """Two-sided one-sample t-test of `values` against 0."""
    if len(values) < 2 or statistics.pstdev(values) == 0:
        return math.nan
    from scipy import stats

    return float(stats.ttest_1samp(values, 0.0).pvalue)


def point(rows: list[dict]) -> dict:
    """Per method: per-seed mean gain over task arithmetic and over the static merge the contest alone would release
    (the best of `PRODUCT_STATICS` on the selection part), the p-values, the validation-to-test gap, and how often
    the product released a static merge."""
    rows = rows + product_rows(rows, PRODUCT_STATICS)
    ta = {group(row): row for row in rows if row["method"] == "task_arithmetic"}
    statics = defaultdict(list)
    for row in rows:
        if row["method"] in PRODUCT_STATICS:
            statics[group(row)].append(row)
    static_release = {g: max(found, key=lambda r: r["selection"]) for g, found in statics.items()}
    out: dict[str, dict] = {}
    for method in SHOWN:
        by_seed: dict[int, list[float]] = defaultdict(list)
        over_static: dict[int, list[float]] = defaultdict(list)
        gaps, wins = [], []
        for row in rows:
            if row["method"] == method and group(row) in ta:
                by_seed[row["seed"]].append(row["test"] - ta[group(row)]["test"])
                over_static[row["seed"]].append(row["test"] - static_release[group(row)]["test"])
                gaps.append(row["validation"] - row["test_normalised"])
                wins.append(row.get("winner", method.removesuffix(PRODUCT)))
        gains = [statistics.mean(values) for _, values in sorted(by_seed.items())]
        static_gains = [statistics.mean(values) for _, values in sorted(over_static.items())]
        out[method] = {"gains": gains, "static_gains": static_gains, "runs": sum(len(v) for v in by_seed.values()),
                       "p_vs_ta": one_sample_p(gains), "p_vs_static": one_sample_p(static_gains),
                       "gap": statistics.mean(gaps) if gaps else math.nan,
                       "static_wins": sum(w != method.removesuffix(PRODUCT) for w in wins)
                       if method.endswith(PRODUCT) else None}
    out["task_arithmetic"] = {"gap": statistics.mean(r["validation"] - r["test_normalised"] for r in ta.values())
                              if ta else math.nan, "groups": len(ta)}
    return out


def fmt(gains: list[float]) -> str:
    if not gains:
        return "n/a"
    return f"{statistics.mean(gains):+.4f} ± {statistics.stdev(gains):.4f}" if len(gains) > 1 else f"{gains[0]:+.4f}"


def setting_section(setting: str, points: dict[int, dict]) -> list[str]:
    """One setting's tables."""
    lines = [f"## {setting}", "", "| search examples per task | method | runs | gain over TA on test | p (vs TA) | "
             "gain over the static release | p | validation-to-test gap | static merge released |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size, methods in points.items():
        for method in SHOWN:
            m = methods[method]
            wins = "" if m["static_wins"] is None else f"{m['static_wins']} of {m['runs']}"
            lines.append(f"| {size} | {method} | {m['runs']} | {fmt(m['gains'])} | {m['p_vs_ta']:.3g} | "
                         f"{fmt(m['static_gains'])} | {m['p_vs_static']:.3g} | {m['gap']:+.3f} | {wins} |")
        lines.append(f"| {size} | task_arithmetic | {methods['task_arithmetic']['groups']} | 0 | | | | "
                     f"{methods['task_arithmetic']['gap']:+.3f} | |")
    lines += ["", "EvoGM (default) against CMA-ES (Welch's t-test over per-seed gains):", "",
              "| search examples per task | EvoGM - CMA-ES | p | EvoGM (product) - CMA-ES (product) | p |",
              "| --- | --- | --- | --- | --- |"]
    for size, methods in points.items():
        cells = []
        for a, b in (("evogm", "cmaes"), ("evogm" + PRODUCT, "cmaes" + PRODUCT)):
            ga, gb = methods[a]["gains"], methods[b]["gains"]
            cells += [f"{statistics.mean(ga) - statistics.mean(gb):+.4f}", f"{welch_p(ga, gb):.3g}"]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return lines + [""]


def report() -> Path:
    lines = ["# The learning curve: when does the search pay? (issue 29, point 6)", "",
             "Generated by `python -m benchmarks.learning_curve` from the rows of "
             + ", ".join(f"`{p.relative_to(RESULTS)}`" for p in SOURCES.values()) + ". Tiny zoo; single-task "
             f"unseen merges of the first 5 unseen tasks ({', '.join(TASKS)}) and the multi-task unseen merge of "
             "all 10; seeds 0-3, 128 evaluations (P = 16, 8 generations), every search started from the tuned "
             "linear static merges, the box [-0.5, 1.5]; the selection part is the same 30 examples per task at "
             "every size; test is 500 examples per task. The search part is the first n of the 70 remaining "
             "validation examples. `(product)`: the search's pick against task arithmetic, model soup and the best "
             "single expert on the selection part (what `evox-merge search` releases, less the other static "
             "merges). Gain: test score minus tuned task arithmetic's (raw accuracy / exact match; single tasks: "
             "averaged over the 5 tasks per seed), mean ± std over seeds; p: one-sample t-test of the 4 per-seed "
             "gains against 0. The static release: the best of those three static merges on the selection part "
             "(what the contest releases without a search). Validation-to-test gap: the pick's normalised "
             "search-part fitness minus its normalised test score. Machine: the shared 2-core CPU (quality only).",
             ""]
    status = []
    figure, axes = plt.subplots(1, len(SETTINGS), figsize=(12, 4))
    for setting, axis in zip(SETTINGS, axes):
        points = {size: point(load_rows(path, setting)) for size, path in SOURCES.items() if path.exists()}
        points = {size: p for size, p in points.items() if all(p[method]["gains"] for method in SHOWN)}
        if not points:
            continue
        status.append(f"{setting} at {sorted(points)} search examples per task")
        lines += setting_section(setting, points)
        sizes = list(points)
        for method in SHOWN:
            gains = [points[s][method]["gains"] for s in sizes]
            axis.errorbar(sizes, [statistics.mean(g) for g in gains],
                          yerr=[statistics.stdev(g) / math.sqrt(len(g)) if len(g) > 1 else 0 for g in gains],
                          marker="o", capsize=3, label=method)
        axis.axhline(0.0, color="grey", linewidth=0.8, label="tuned task arithmetic")
        axis.set_xscale("log", base=2)
        axis.set_xticks(sizes, [str(s) for s in sizes])
        axis.set_xlabel("search examples per task")
        axis.set_ylabel("test gain over tuned TA (mean ± s.e.)")
        axis.set_title(f"tiny zoo, {setting}, 128 evaluations", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / "learning_curve.png", dpi=120)
    plt.close(figure)
    lines[2:2] = [f"**Status:** {'; '.join(status)} (a size appears once all four rows of it have runs). Not run: "
                  "the t5 and smollm2 zoos, and sizes above 64 (the tiny zoo's validation files hold 100 examples per "
                  "task, 30 of them the selection part).", ""]
    lines += ["![learning curve](learning_curve.png)", ""]
    path = RESULTS / "learning_curve.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    print(report())
