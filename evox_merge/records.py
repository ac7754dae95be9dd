"""Every evaluated candidate as a JSON line in records.jsonl, written as soon as its population is scored.

`SearchMonitor` is an EvoX `Monitor`, so any algorithm run by `StdWorkflow` gets records for free. An algorithm
may annotate its candidates by defining ``candidate_context() -> dict`` (EvoGM gives the round, the iteration,
the coefficients in the round's basis and the records its basis came from).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from evox.core import Monitor

from evox_merge.progress import SearchProgress

RECORDS_NAME = "records.jsonl"


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a run, in evaluation order."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def truncate_records(path: str | Path, keep: int) -> None:
    """Keep the first `keep` records (those a checkpoint covers); drop any later or half-written line."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        lines = [line for line in handle if line.endswith("\n")][:keep]
    if len(lines) < keep:
        raise RuntimeError(f"{path} holds {len(lines)} records but the checkpoint covers {keep}")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(path)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class SearchMonitor(Monitor):
    """Writes one record per evaluated candidate and reports progress per generation.

    Args:
        records_path: the JSONL file to append to.
        task_names: K task names (per-task scores come from `task_scores()` after each evaluation).
        task_scores: returns the ``(P, K)`` scores of the population just evaluated.
        expert_names: the experts, the parents of every candidate in the original basis.
        progress: the live display (None: none).
        context: returns the algorithm's per-candidate annotations (or an empty dict).
        write: False on every distributed rank but 0: count and track, write nothing.
    """

    def __init__(
        self,
        records_path: str | Path,
        task_names: list[str],
        task_scores: Callable[[], torch.Tensor],
        expert_names: list[str],
        progress: SearchProgress | None = None,
        context: Callable[[], dict[str, Any]] = dict,
        write: bool = True,
    ) -> None:
        super().__init__()
        self.records_path = Path(records_path)
        self.task_names = task_names
        self._task_scores = task_scores
        self.expert_names = expert_names
        self.progress = progress
        self.context = context
        self.write = write
        self.count = 0
        self.generation = 0
        self.best = -math.inf
        self._population: torch.Tensor | None = None
        self._started = 0.0

    def restart(self, count: int, generation: int, best: float) -> None:
        """Continue after `count` records and `generation` generations with best fitness `best` (on resume)."""
        self.count, self.generation, self.best = count, generation, best

    def post_ask(self, candidate_solution: torch.Tensor) -> None:
        self._population = candidate_solution.detach().cpu().float()
        self._started = time.perf_counter()

    def post_eval(self, fitness: torch.Tensor) -> None:
        if self.write:
            self._write_records(fitness)
        fitness_list = fitness.detach().cpu().double().tolist()
        self.count += len(fitness_list)
        finite = [v for v in fitness_list if math.isfinite(v)]
        self.best = max([self.best, *finite])
        median = float(torch.tensor(finite).median()) if finite else math.nan
        if self.progress is not None:
            seconds = (time.perf_counter() - self._started) / max(len(fitness_list), 1)
            self.progress.update(self.generation, len(fitness_list), self.best, median, seconds)
        self.generation += 1

    def _write_records(self, fitness: torch.Tensor) -> None:
        seconds = (time.perf_counter() - self._started) / max(len(fitness), 1)
        scores = self._task_scores()
        context = self.context()
        fitness_list = fitness.detach().cpu().double().tolist()
        lines = []
        for p, value in enumerate(fitness_list):
            record = {
                "id": self.count + p,
                "generation": self.generation,
                "coefficients": self._population[p].tolist(),
                "fitness": _finite_or_none(value),
                "task_scores": {name: _finite_or_none(float(s)) for name, s in zip(self.task_names, scores[p])},
                "operator": "linear",
                "parents": self.expert_names,
                "seconds": round(seconds, 6),
            }
            for key, values in context.items():
                record[key] = values[p] if isinstance(values, list) else values
            lines.append(json.dumps(record) + "\n")
        with open(self.records_path, "a", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
