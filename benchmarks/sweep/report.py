"""Sweep results as a person reads them: Markdown tables (test mean +- std, Welch's t-test of EvoGM against each
other search method), convergence plots (best-so-far validation fitness vs evaluations) and a cost table."""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.sweep.config import SEARCH_METHODS  # noqa: E402
from evox_merge.problems.static_names import RANDOM_STATIC_MERGES  # noqa: E402

Row = dict[str, Any]


def mean_std(values: list[float]) -> str:
    """``mean ± std`` to 4 decimals (the value alone for one sample, "" for none)."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def per_seed_average(rows: list[Row], key: str = "test") -> dict[str, dict[int, float]]:
    """method -> seed -> `key` averaged over the setting's task groups (one group in multi-task settings)."""
    grouped: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        grouped[row["method"]][row["seed"]].append(row[key])
    return {method: {seed: statistics.mean(v) for seed, v in seeds.items()} for method, seeds in grouped.items()}


def welch_p(first: list[float], second: list[float]) -> float:
    """Two-sided Welch's t-test p-value (NaN when either sample is too small or both are constant)."""
    if len(first) < 2 or len(second) < 2:
        return math.nan
    try:
        from scipy import stats
    except ImportError:
        raise ImportError("the sweep's p-values need scipy: pip install -e '.[bench]'") from None
    return float(stats.ttest_ind(first, second, equal_var=False).pvalue)


PRODUCT = " (product)"


def product_rows(rows: list[Row], statics: list[str]) -> list[Row]:
    """What a user gets from each search run: its pick against the static merges `statics` of the same task group
    (DARE of the same seed), whichever scores best on the selection part. Rows named ``<method> (product)`` with
    ``winner`` saying which won."""
    products = []
    for row in rows:
        if row["evaluations"] is None:
            continue
        rivals = [r for r in rows if r["evaluations"] is None and r["method"] in statics
                  and r["setting"] == row["setting"] and r["tasks"] == row["tasks"]
                  and (r["method"] not in RANDOM_STATIC_MERGES or r["seed"] == row["seed"])]
        key = lambda r: -math.inf if r.get("selection") is None else r["selection"]  # noqa: E731
        winner = max([*rivals, row], key=key)  # the static merges first: they win exact ties, as in `select_release`
        products.append({**row, "method": row["method"] + PRODUCT, "winner": winner["method"],
                         "test": winner["test"], "selection": winner.get("selection"),
                         "test_normalised": winner.get("test_normalised")})
    return products


def setting_table(rows: list[Row], methods: list[str]) -> str:
    """Methods x task groups: test mean ± std over seeds, the average, validation, and Welch p-values of EvoGM
    against each search (and of EvoGM's product against each product)."""
    groups = sorted({"+".join(row["tasks"]) for row in rows})
    by_cell: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        by_cell[(row["method"], "+".join(row["tasks"]))].append(row["test"])
    averages = per_seed_average(rows)
    validation = per_seed_average(rows, "validation")
    header = ["method", *(g if len(groups) > 1 else "test" for g in groups)]
    header += ["average test", "search part", "p (EvoGM vs this)"] if len(groups) > 1 else [
        "search part", "p (EvoGM vs this)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method in methods:
        if method not in averages:
            continue
        cells = [mean_std(by_cell[(method, group)]) for group in groups]
        if len(groups) > 1:
            cells.append(mean_std(list(averages[method].values())))
        cells.append(mean_std(list(validation[method].values())))
        base = method.removesuffix(PRODUCT)
        reference = "evogm" + (PRODUCT if method.endswith(PRODUCT) else "")
        p = None
        if base in SEARCH_METHODS and method != reference and reference in averages:
            p = welch_p(list(averages[reference].values()), list(averages[method].values()))
        cells.append("" if p is None else ("n/a" if math.isnan(p) else f"{p:.3g}"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def convergence_plot(rows: list[Row], methods: list[str], path: str | Path, title: str) -> None:
    """Best-so-far validation fitness vs evaluations: mean over seeds (curves averaged over task groups first)
    with a ±1 std band, one line per search method."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        per_seed: dict[int, list[list[float]]] = defaultdict(list)
        for row in rows:
            if row["method"] == method and row["curve"]:
                per_seed[row["seed"]].append(row["curve"])
        if not per_seed:
            continue
        curves = [[statistics.mean(values) for values in zip(*group)] for group in per_seed.values()]
        mean = [statistics.mean(values) for values in zip(*curves)]
        spread = [statistics.pstdev(values) for values in zip(*curves)]
        x = range(1, len(mean) + 1)
        axis.plot(x, mean, label=method, linewidth=2 if method == "evogm" else 1.2)
        axis.fill_between(x, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)], alpha=0.15)
    axis.set_xlabel("evaluations")
    axis.set_ylabel("best validation fitness so far")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def cost_table(rows: list[Row], methods: list[str]) -> str:
    """Per method: runs, mean evaluations, the share of validation examples scored (below 100% only with
    racing), wall seconds, seconds inside the algorithm vs inside evaluation, and which machines ran the runs
    (wall times compare only within one machine)."""
    lines = ["| method | runs | evaluations | examples scored | wall s | algorithm s | evaluation s | algorithm share "
             "| ran on |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in methods:
        chosen = [row for row in rows if row["method"] == method]
        if not chosen:
            continue
        wall = statistics.mean(row["wall_seconds"] for row in chosen)
        machines = ran_on(chosen)
        if chosen[0]["evaluations"] is None:
            lines.append(f"| {method} | {len(chosen)} | static | | {wall:.1f} | | | | {machines} |")
            continue
        evaluations = statistics.mean(row["evaluations"] for row in chosen)
        examples = statistics.mean(row.get("examples_fraction", 1.0) for row in chosen)
        timed = [row for row in chosen if row.get("algorithm_seconds") is not None]
        if not timed:  # rows that did not record the split of their time
            lines.append(f"| {method} | {len(chosen)} | {evaluations:.0f} | {examples:.0%} | {wall:.1f} | "
                         f"not recorded | not recorded | | {machines} |")
            continue
        algorithm = statistics.mean(row["algorithm_seconds"] for row in timed)
        evaluation = statistics.mean(row["evaluation_seconds"] for row in timed)
        share = algorithm / (algorithm + evaluation) if algorithm + evaluation > 0 else 0.0
        note = "" if len(timed) == len(chosen) else f" ({len(timed)} runs)"
        lines.append(f"| {method} | {len(chosen)} | {evaluations:.0f} | {examples:.0%} | {wall:.1f} | "
                     f"{algorithm:.2f}{note} | {evaluation:.1f}{note} | {share:.1%} | {machines} |")
    return "\n".join(lines)


def ran_on(rows: list[Row]) -> str:
    """Where rows ran: each machine label (`host_label`) with its count of rows."""
    hosts = Counter(host_label(row.get("host"), row.get("device")) for row in rows)
    return ", ".join(f"{label} x{count}" for label, count in sorted(hosts.items()))


def host_label(host: str | None, device: str | None = None) -> str:
    """A short machine label from a row's host description (rows from before hosts were recorded: this repo's
    2-core benchmark machine) and the device it scored on (rows without one, or "cpu": the CPU, even where a GPU
    was present)."""
    if not host:
        return "2 cores"
    parts = [part.strip() for part in host.split(",")]
    label = " + ".join(part for part in parts[1:] if part) or host
    return label + (f", scored on {device}" if device and device != "cpu" else "")


def task_table(rows: list[Row], methods: list[str]) -> str:
    """Test score per task (mean over seeds) of each method's choice in a multi-task setting, and their mean: the
    shape of arXiv 2605.29295's Table 2 ("" when a row has no per-task scores or the setting is single-task)."""
    if not rows or any(len(row["tasks"]) < 2 or "test_tasks" not in row for row in rows):
        return ""
    tasks = list(rows[0]["tasks"])
    lines = ["| method | " + " | ".join(tasks) + " | mean |", "| --- |" + " --- |" * (len(tasks) + 1)]
    for method in methods:
        chosen = [row for row in rows if row["method"] == method]
        if not chosen:
            continue
        means = [statistics.mean(row["test_tasks"][task] for row in chosen) for task in tasks]
        lines.append(f"| {method} | " + " | ".join(f"{m:.4f}" for m in means)
                     + f" | {statistics.mean(row['test'] for row in chosen):.4f} |")
    return "\n".join(lines)


def write_report(rows: list[Row], methods: list[str], out_dir: str | Path, preamble: str,
                 product_statics: list[str] = ()) -> Path:
    """Write results.md (per setting and budget: scores, convergence PNG, cost) under `out_dir`; return its path.

    Each search method gets a second row, ``<method> (product)`` (`product_rows`): a static merge winning the
    selection there cannot hide a weak algorithm in the first row."""
    out_dir = Path(out_dir)
    sections = [preamble]
    keys = sorted({(row["setting"], row["budget"]) for row in rows}, key=lambda k: (k[0], k[1] != "paper", k[1]))
    for setting, budget in keys:
        chosen = [r for r in rows if r["setting"] == setting and (r["budget"] == budget or r["evaluations"] is None)]
        chosen = chosen + product_rows(chosen, list(product_statics))
        shown = [m for method in methods for m in ([method, method + PRODUCT] if method in SEARCH_METHODS else [method])]
        plot_name = f"convergence_{setting}_{budget}.png"
        tasks = task_table([r for r in chosen if not r["method"].endswith(PRODUCT)], methods)
        convergence_plot(chosen, [m for m in methods if m in SEARCH_METHODS], out_dir / plot_name,
                         f"{setting}, budget {budget}")
        sections.append(f"## {setting}, budget `{budget}`\n\nTest scores of each method's choice (chosen on "
                        f"the search part, picked on the selection part); mean ± std over seeds; `(product)` rows: the "
                        f"pick against the static merges on the selection part.\n\n{setting_table(chosen, shown)}\n\n"
                        + (f"Test score per task (mean over seeds):\n\n{tasks}\n\n" if tasks else "") +
                        f"![convergence]({plot_name})\n\nCost per run (mean over its runs):\n\n"
                        f"{cost_table([r for r in chosen if not r['method'].endswith(PRODUCT)], methods)}\n")
    path = out_dir / "results.md"
    path.write_text("\n".join(sections))
    return path
