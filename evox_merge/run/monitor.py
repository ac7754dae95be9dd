"""The run's monitor and records: every evaluated candidate as a record, in memory and in records.jsonl.

`RunMonitor` is an EvoX `Monitor`. Under `MergeWorkflow` a `MergeProblem` in per-task mode hands it the
``(P, K)`` per-task scores directly in ``post_eval`` (the workflow aggregates them into the fitness the algorithm
sees); a problem that returns one fitness per candidate works too (records then have no task scores). The run
loop (`evox_merge.run.loop`) calls `RunMonitor.flush` after each step with the algorithm's candidate annotations
(`evox_merge.algorithms.common`), which writes the step's records.

**The evidence record.** Every line of records.jsonl is the evidence for one candidate (`EVIDENCE_FIELDS`): its id
(= its lineage DAG node ``record:<id>``), ``parents`` (the records or the basis it was generated from, as the
algorithm reports them: ``record:<id>``, ``expert:<name>``; ``"none"`` where the algorithm does not know them, never
invented), the merge ``operator`` and ``coefficients`` (original expert basis), its scores (``task_scores``, the
``fitness`` and, with pareto objectives, ``objectives``) and its ``seconds`` of evaluation. The fields that are the
same for every candidate of a run (base family, tokenizer compatibility, evaluation suite with the task-file hashes,
device, intended use, the operator in words, the experts' hashes) are written once, in run.json's ``evidence``
(`evox_merge.run.evidence.run_evidence`), and each record points there with ``"run_evidence": "run.json#evidence"``:
a run of 10^4 candidates repeats no hash or sentence 10^4 times, and `evox_merge.run.evidence.full_record` joins the
two into the complete record.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from evox.core import Monitor

from evox_merge.run.progress import SearchProgress
from evox_merge.util.atomic import write_text_atomic
from evox_merge.util.errors import RunStateError

RUN_EVIDENCE = "run.json#evidence"
# Per-record evidence fields; the run-constant ones live in run.json (`evox_merge.run.evidence.RUN_EVIDENCE_FIELDS`).
EVIDENCE_FIELDS = ("id", "lineage_node", "parents", "operator", "coefficients", "task_scores", "fitness", "seconds",
                   "run_evidence")


def parent_ids(value: Any, expert_names: list[str]) -> list[str] | str:
    """An algorithm's ``parents`` annotation as lineage node ids: ``"experts"`` -> ``expert:<name>`` for each
    expert, record ids -> ``record:<id>``, anything else (``"none"``, missing) -> ``"none"``."""
    if value == "experts":
        return [f"expert:{name}" for name in expert_names]
    if isinstance(value, list) and value:
        return [f"record:{int(v)}" for v in value]
    return "none"


def read_records(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The records of a run in evaluation order (only the first `limit` with a limit): one per complete line. A
    last line without its newline is a record a killed run was still writing: not a record (yet).

    Raises:
        RunStateError: a complete line that is not a JSON record (names the file and the line).
    """
    return [record for _, record in _record_lines(Path(path), limit)]


def truncate_records(path: str | Path, keep: int) -> None:
    """Keep the first `keep` records (those a checkpoint covers); drop any later or half-written line.

    Raises:
        RunStateError: fewer than `keep` complete records, or a line among them that is not a record.
    """
    path = Path(path)
    if not path.exists():
        return
    lines = [line for line, _ in _record_lines(path, keep)]
    if len(lines) < keep:
        raise RunStateError(f"{path} holds {len(lines)} complete records but the checkpoint covers {keep}: records "
                            "were lost, so the run cannot be continued exactly; start again with --overwrite")
    write_text_atomic(path, b"".join(lines).decode("utf-8"))


def _record_lines(path: Path, limit: int | None) -> list[tuple[bytes, dict[str, Any]]]:
    """The first `limit` (default: every) complete lines of records.jsonl, each with the record it holds."""
    lines: list[tuple[bytes, dict[str, Any]]] = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if len(lines) == limit or not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line.rstrip(b"\n"))
            except ValueError as error:  # malformed JSON, or bytes that are not UTF-8
                raise RunStateError(f"{path}:{number}: not a record ({error}); the file was damaged or edited "
                                    "after the search wrote it") from None
            if not isinstance(record, dict):
                raise RunStateError(f"{path}:{number}: not a record (a JSON {type(record).__name__}, expected an "
                                    "object); the file was damaged or edited after the search wrote it")
            lines.append((line, record))
    return lines


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class RunMonitor(Monitor):
    """Collects one record per evaluated candidate and reports progress per generation.

    Args:
        task_names: the K tasks whose scores a per-task problem returns (empty for a scalar problem).
        aggregate: ``(P, K)`` per-task scores -> ``(P,)`` fitness (the problem's weighted mean), higher is better.
        expert_names: the experts, the parents of every candidate in the original basis.
        records_path: the JSONL file to append each step's records to (None: keep them in memory only).
        progress: the live display (None: none).
        write: False on every distributed rank but 0: count and track, write nothing.
        objectives: ``(P, K)`` per-task scores -> ``(P, M)`` objective values (pareto objectives), with
            `objective_names`; each record then holds ``objectives``.

    Attributes:
        records: the records of this process's run so far (after `restart`, only the new ones).
        count: candidates evaluated in the whole run; generation: steps done; best: best fitness so far.
        evaluation_seconds: wall time spent inside the problem's evaluations.
    """

    accepts_task_scores = True  # MergeWorkflow hands post_eval the (P, K) per-task scores

    def __init__(
        self,
        task_names: list[str],
        aggregate: Callable[[torch.Tensor], torch.Tensor] | None,
        expert_names: list[str],
        records_path: str | Path | None = None,
        progress: SearchProgress | None = None,
        write: bool = True,
        objectives: Callable[[torch.Tensor], torch.Tensor] | None = None,
        objective_names: list[str] | tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.aggregate = aggregate
        self.expert_names = list(expert_names)
        self.records_path = Path(records_path) if records_path is not None else None
        self.progress = progress
        self.write = write
        self.objectives = objectives
        self.objective_names = list(objective_names)
        self.records: list[dict[str, Any]] = []
        self.count = 0
        self.generation = 0
        self.best = -math.inf
        self.evaluation_seconds = 0.0
        self._pending: list[dict[str, Any]] = []
        self._population: torch.Tensor | None = None
        self._started = 0.0

    def restart(self, count: int, generation: int, best: float) -> None:
        """Continue after `count` records and `generation` generations with best fitness `best` (on resume)."""
        self.count, self.generation, self.best = count, generation, best

    def post_ask(self, candidate_solution: torch.Tensor) -> None:
        self._population = candidate_solution.detach().cpu().float()
        self._started = time.perf_counter()

    def post_eval(self, fitness: torch.Tensor) -> None:
        seconds = time.perf_counter() - self._started
        self.evaluation_seconds += seconds
        fitness = fitness.detach().cpu().double()
        task_scores = objective_values = None
        if fitness.ndim == 2:
            task_scores, fitness = fitness, self.aggregate(fitness).detach().cpu().double()
            if self.objectives is not None:
                objective_values = self.objectives(task_scores).detach().cpu().double()
        per_candidate = seconds / max(len(fitness), 1)
        for p, value in enumerate(fitness.tolist()):
            identifier = self.count + len(self._pending)
            record = {
                "id": identifier,
                "lineage_node": f"record:{identifier}",
                "generation": self.generation,
                "coefficients": self._population[p].tolist(),
                "fitness": _finite_or_none(value),
                "task_scores": {} if task_scores is None else {
                    name: _finite_or_none(float(s)) for name, s in zip(self.task_names, task_scores[p])},
                **({} if objective_values is None else {"objectives": {
                    name: _finite_or_none(float(v)) for name, v in zip(self.objective_names, objective_values[p])}}),
                "operator": "linear",
                "parents": "none",
                "seconds": round(per_candidate, 6),
                "run_evidence": RUN_EVIDENCE,
            }
            self._pending.append(record)

    def flush(self, annotations: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """End a step: annotate its records (lists of one entry per candidate, or shared values), keep them,
        append them to records.jsonl, update the progress display. Returns the step's records."""
        records, self._pending = self._pending, []
        for key, values in (annotations or {}).items():
            if isinstance(values, list) and len(values) != len(records):
                continue  # annotations of another population size (an algorithm that evaluated twice)
            for p, record in enumerate(records):
                record[key] = values[p] if isinstance(values, list) else values
        for record in records:
            record["parents"] = parent_ids(record["parents"], self.expert_names)
        if self.write and self.records_path is not None and records:
            with open(self.records_path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in records)
                handle.flush()
        self.records += records
        self.count += len(records)
        finite = [r["fitness"] for r in records if r["fitness"] is not None]
        self.best = max([self.best, *finite])
        if self.progress is not None and records:
            median = float(torch.tensor(finite).median()) if finite else math.nan
            self.progress.update(self.generation, len(records), self.best, median, records[0]["seconds"])
        self.generation += 1
        return records

    def best_record(self) -> dict[str, Any]:
        """The record with the highest finite fitness among `records` (the first one on ties)."""
        finite = [r for r in self.records if r["fitness"] is not None]
        if not finite:
            raise ValueError("no candidate has a finite fitness")
        return max(finite, key=lambda r: r["fitness"])

    def best_so_far(self) -> list[float]:
        """Best fitness after each evaluation of `records` (-inf until the first finite one)."""
        curve, best = [], -math.inf
        for record in self.records:
            if record["fitness"] is not None:
                best = max(best, record["fitness"])
            curve.append(best)
        return curve
