"""Run a sweep: every cell of the grid, in parallel worker processes, resumable (finished cells are skipped)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
from datetime import datetime, timezone
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from benchmarks.sweep.cells import Cell, grid, run_cell
from benchmarks.sweep.config import STATIC_METHODS, SweepConfig, load_sweep_config, override_device
from benchmarks.sweep.report import write_report
from benchmarks.sweep.setup import load_setup
from evox_merge.util.atomic import write_text_atomic
from evox_merge.util.machine import host_description, machine_markdown

logger = logging.getLogger(__name__)
ROWS_NAME = "rows.jsonl"
HOST = host_description()
TIMING_NAME = "timing.jsonl"


def _finished(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[Cell(row["setting"], tuple(row["tasks"]), row["method"], row["seed"], row["budget"]).key] = row
    return rows


def run_sweep(config: SweepConfig | str | Path, *, progress: bool = True, report_only: bool = False,
              only: dict[str, set[str]] | None = None, workers: int | None = None,
              device: str | None = None) -> Path:
    """Run (or finish) a sweep and write rows.jsonl, results.md, the convergence plots and the exact config.

    Time is recorded in timing.jsonl after every finished cell (one entry per invocation, with the machine it ran
    on), so a sweep stopped midway and resumed in several sittings, or split over machines, still reports its whole
    wall time. With `report_only`, no cell runs: results.md is written from the rows finished so far (a partial
    report says how many cells remain). `only` runs a slice of the grid (e.g. ``{"setting": {"multi_task_seen"}}``:
    a cell runs when each named field's value is one of those given), `workers` and `device` override the
    config's (each row records the device it scored on); the report still covers the whole grid.

    Returns:
        the path of results.md.
    """
    if not isinstance(config, SweepConfig):
        config = load_sweep_config(config)
    given = config  # config.yaml records the sweep as configured; this invocation's overrides go to timing.jsonl
    config = override_device(config, device)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup = load_setup(config.setup)
    cells = grid(config, setup)
    rows_path = out / ROWS_NAME
    done = _finished(rows_path)
    todo = [cell for cell in cells if cell.key not in done and _selected(cell, only or {})]
    if workers is not None:
        config = config.model_copy(update={"workers": workers})
    if not report_only:
        _refuse_mixed_starts(done, config, rows_path)
        (out / "config.yaml").write_text(yaml.safe_dump(given.model_dump(mode="json"), sort_keys=False))
        logger.info("sweep: %d cells, %d already done, %d to run now", len(cells), len(done), len(todo))
        _run_cells(todo, config, out, len(cells), progress)
        done = _finished(rows_path)
    wanted = {cell.key for cell in cells}
    rows = [row for key, row in done.items() if key in wanted]
    remaining = len(cells) - len(rows)
    preamble = _preamble(config, setup, _invocations(out / TIMING_NAME))
    if remaining:
        preamble += (f"\n**Partial results: {len(rows)} of {len(cells)} cells finished, {remaining} still to run** "
                     "(rerun the sweep command to finish; it resumes).\n")
    return write_report(rows, config.methods, out, preamble, config.product_statics)


def _refuse_mixed_starts(done: dict[str, dict], config: SweepConfig, rows_path: Path) -> None:
    """MergeInputError when `rows_path` holds search rows that started otherwise than ``config.start`` says (a row
    without ``start`` was written before the key existed and started ``default``): resuming would mix starts in one
    table. Static merges' rows do not depend on the start."""
    from evox_merge.run.registry import takes_starting_points
    from evox_merge.util.errors import MergeInputError

    expected = {}
    for row in done.values():
        if row["method"] in STATIC_METHODS:
            continue
        if row["method"] not in expected:
            expected[row["method"]] = config.start if takes_starting_points(row["method"]) else "default"
        found = row.get("start", "default")
        if found != expected[row["method"]]:
            raise MergeInputError(
                f"start: {rows_path} holds rows that started {found!r} (method {row['method']}, seed {row['seed']}; "
                f"rows without a 'start' field predate the key and started 'default'), but the config asks for "
                f"start {config.start!r}; resuming would mix starts in one table. Set 'start: {found}' in the config "
                "to finish that sweep, or use another output_dir")


def _selected(cell: Cell, only: dict[str, set[str]]) -> bool:
    return all(str(getattr(cell, field)) in choices for field, choices in only.items())


def _run_cells(todo: list[Cell], config: SweepConfig, out: Path, total: int, progress: bool) -> None:
    """Run the cells longest first, appending each row as it finishes and updating this invocation's time."""
    started, start_date = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    bar = tqdm(total=total, initial=total - len(todo), unit="run", disable=not progress)
    longest_first = sorted(todo, key=lambda cell: _relative_cost(cell, config), reverse=True)
    finished = 0

    def append(handle, row: dict) -> None:
        nonlocal finished
        _append(handle, row, bar)
        finished += 1
        _record_time(out / TIMING_NAME, start_date, finished, time.perf_counter() - started, config.workers,
                     config.setup.device)

    with open(out / ROWS_NAME, "a") as handle:
        if config.workers == 1:
            for cell in longest_first:
                append(handle, run_cell(cell, config))
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(config.workers, mp_context=context, initializer=_end_on_ctrl_c) as pool:
                futures = [pool.submit(run_cell, cell, config) for cell in longest_first]
                try:
                    for future in as_completed(futures):
                        append(handle, future.result())
                except KeyboardInterrupt:  # Ctrl-C: start no other cell (those finished are in rows.jsonl)
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    bar.close()


def _end_on_ctrl_c() -> None:
    """In a worker process: Ctrl-C ends it at once and quietly (the main process says what was kept; the cell it
    was running reruns when the sweep resumes)."""
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))


def _record_time(path: Path, start_date: str, cells: int, seconds: float, workers: int, device: str) -> None:
    """Write this invocation's entry (cells finished, seconds so far, its workers and device) into timing.jsonl,
    replacing its last one."""
    entries = [entry for entry in _invocations(path) if entry["date"] != start_date]
    entries.append({"date": start_date, "cells": cells, "seconds": seconds, "workers": workers, "device": device,
                    "host": HOST})
    write_text_atomic(path, "".join(json.dumps(entry) + "\n" for entry in entries))


def _relative_cost(cell: Cell, config: SweepConfig) -> int:
    """Tasks x evaluations of a cell (static merges count as one population), to hand out long cells first so
    that workers finish together."""
    budget = config.budgets[cell.budget]
    generations = 1 if cell.method in STATIC_METHODS else budget.generations
    return len(cell.tasks) * generations


def _timing_summary(invocations: list[dict]) -> str:
    if not invocations:
        return "no recorded time (timing.jsonl is missing)"
    minutes = sum(entry["seconds"] for entry in invocations) / 60
    parts = ", ".join(f"{e['cells']} cells in {e['seconds'] / 60:.1f} min with {e['workers']} worker processes"
                      + (f" scoring on {e['device']}" if e.get("device", "cpu") != "cpu" else "")
                      + f" on {e['date'][:10]}" + (f" ({e['host']})" if e.get("host") else "") for e in invocations)
    return f"{minutes:.1f} minutes in all ({parts}; from timing.jsonl)"


def _append(handle, row: dict, bar) -> None:
    handle.write(json.dumps(row) + "\n")
    handle.flush()
    bar.update(1)


def _invocations(path: Path) -> list[dict]:
    """The timing.jsonl entries: one per invocation of the sweep that ran cells."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _preamble(config: SweepConfig, setup, invocations: list[dict]) -> str:
    budgets = ", ".join(
        f"`{name}`: P = {b.pop_per_expert}N = {b.pop_per_expert * setup.experts.num_experts}, "
        f"{b.generations} generations = "
        f"{b.pop_per_expert * setup.experts.num_experts * b.generations} evaluations "
        f"(EvoGM: {b.rounds} rounds x {b.iterations} iterations)"
        for name, b in config.budgets.items()
    )
    return f"""# Benchmark sweep

{setup.experts.num_experts} experts; seen tasks {setup.seen}; unseen tasks {setup.unseen}.
Budgets per search: {budgets}. Seeds {config.seeds}. Each validation file is split into a selection part
({config.selection_fraction:.0%} of it) and a search part (at most {config.max_validation_examples or "all"} examples
per task); fitness is the {config.normalise} normalised mean. Static merges are tuned on the search part too (best
single expert, task arithmetic / TIES / DARE scaling from a grid); each search's pick is the best of its
{config.selection_top_k} best candidates on the selection part. Test scores are raw means over every test example.
Searches start `{config.start}` (`static`: from the static merges tuned on the search part, as the product's
`algorithm.start`; `default`: each algorithm's own start).
Running the cells took {_timing_summary(invocations)}.
Exact config: `config.yaml`.

Machine:
{machine_markdown()}
"""
