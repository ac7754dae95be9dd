"""How large should the selection part be? The same sweep once per `selection_fraction`, compared on test.

    python -m benchmarks.selection_fraction [--fractions 0.1 0.2 0.3 0.5] [--config benchmarks/configs/selection_fraction.yaml]

Each fraction's sweep (single-task unseen tasks, EvoGM and the static merges, no cap on the search part, so a
larger selection part means a smaller search part) runs with the resumable sweep runner into ``<output_dir>/f<f>/``.
This script then reports, per fraction, the test score of what a user gets (the product: EvoGM's pick against the
static merges on the selection part) and of EvoGM's pick alone, averaged over tasks then seeds, in
``benchmarks/results/selection_fraction.md``. The default `selection_fraction` of a search is chosen from it.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.sweep.config import load_sweep_config
from benchmarks.sweep.report import PRODUCT, product_rows
from benchmarks.sweep.runner import ROWS_NAME, _finished, _invocations, _timing_summary, run_sweep
from evox_merge.util.machine import machine_markdown


def _per_seed(rows: list[dict], method: str) -> list[float]:
    by_seed: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        if row["method"] == method:
            by_seed[row["seed"]].append(row["test"])
    return [statistics.mean(values) for values in by_seed.values()]


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{spread}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="benchmarks/configs/selection_fraction.yaml")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    args = parser.parse_args(argv)
    base = load_sweep_config(args.config)
    root = Path(base.output_dir)
    lines = []
    for fraction in args.fractions:
        config = base.model_copy(update={"selection_fraction": fraction, "output_dir": str(root / f"f{fraction}")})
        run_sweep(config)
        out = Path(config.output_dir)
        rows = list(_finished(out / ROWS_NAME).values())
        statics = [row for row in rows if row["evaluations"] is None]
        searches = [row for row in rows if row["evaluations"] is not None]
        products = product_rows(rows, list(base.product_statics))
        winners = defaultdict(int)
        for row in products:
            winners[row["winner"]] += 1
        lines.append(
            f"| {fraction:.1f} | {_cell(_per_seed(products, 'evogm' + PRODUCT))} | {_cell(_per_seed(searches, 'evogm'))} | "
            f"{_cell(_per_seed(statics, 'task_arithmetic'))} | {_cell(_per_seed(statics, 'best_single'))} | "
            f"{', '.join(f'{name} {count}' for name, count in sorted(winners.items()))} | "
            f"{_timing_summary(_invocations(out / 'timing.jsonl'))} |")
    table = "\n".join(lines)
    text = f"""# How large a selection part?

`python -m benchmarks.selection_fraction --fractions {' '.join(str(f) for f in args.fractions)}` (config
`{args.config}`). Each validation file (100 examples) is split into a selection part (the fraction) and a search
part (the rest, uncapped); EvoGM searches on the search part (128 evaluations), its 5 best candidates and the static
merges (each tuned on the search part) compete on the selection part. Tasks: {', '.join(base.single_task_tasks)}
(single-task), seeds {base.seeds}. Test: raw accuracy on all 500 test examples, mean over tasks, then mean ± std over
seeds. `product` is what a search run releases; `EvoGM alone` its own pick; the static rows are tuned on the search part
(their scores move with the fraction because their search part does).

| selection fraction | product (release) test | EvoGM alone test | task arithmetic test | best single test | what the product released (runs) | time |
| --- | --- | --- | --- | --- | --- | --- |
{table}

Machine:
{machine_markdown()}
"""
    path = root.parent / "selection_fraction.md"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
