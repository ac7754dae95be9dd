"""The evidence record of every candidate, and its ancestry (``evox-merge lineage RUN [--candidate ID]``).

A candidate's evidence is its line in records.jsonl (`evox_merge.run.monitor.EVIDENCE_FIELDS`: id and lineage node,
parents, operator, coefficients, scores, seconds) joined with the run-constant part in run.json's ``evidence``
(`RUN_EVIDENCE_FIELDS`: base family, tokenizer compatibility, operator in words, the experts and their hashes, the
evaluation suite with the task-file hashes, the resource profile's device, intended use); `full_record` joins them.
Records name their parents as lineage nodes (``record:<id>``, ``expert:<name>``), so the lineage DAG is the
records themselves: `ancestry` walks it from one candidate back to the experts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from evox_merge.util.atomic import write_text_atomic
from evox_merge.util.errors import MergeInputError

RUN_EVIDENCE_FIELDS = ("base_family", "tokenizer_compatibility", "operator_description", "experts",
                       "evaluation_suite", "resource_profile", "intended_use")


def run_evidence(config: Any, experts: Any, device: str, objectives: Any) -> dict[str, Any]:
    """The run-constant evidence fields for run.json (`RUN_EVIDENCE_FIELDS`)."""
    from evox_merge.run.recipe import OPERATOR, tokenizer_check

    model_config = experts.model.config
    return {
        "base_family": {"model_type": getattr(model_config, "model_type", None),
                        "architectures": list(getattr(model_config, "architectures", None) or []),
                        "base": experts.base_path, "base_sha256": experts.base_hash},
        "tokenizer_compatibility": tokenizer_check(experts),
        "operator_description": {"linear": OPERATOR},
        "experts": [{"name": e["name"], "sha256": e["sha256"]} for e in experts.metadata],
        "evaluation_suite": {
            "tasks": [{"name": s["name"], "type": s["type"], "weight": s.get("weight", 1.0)} for s in config.tasks],
            "task_file_hashes": "run.json#task_hashes",
            "examples": "the search part of each validation file (records' task_scores and fitness)",
            "normalisation": config.normalise,
            "objectives": objectives.to_dict(),
        },
        "resource_profile": {"device": device, "per_candidate": "each record's 'seconds' (wall time of its "
                                                                "evaluation, its population's share)"},
        "intended_use": config.intended_use,
    }


def full_record(record: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """A record joined with the run-constant evidence it references (task-file hashes resolved)."""
    evidence = dict(run["evidence"])
    suite = dict(evidence["evaluation_suite"])
    suite["task_file_hashes"] = run.get("task_hashes", {})
    return {**record, **evidence, "evaluation_suite": suite}


def ancestry(records: dict[int, dict[str, Any]], candidate: int) -> tuple[list[str], list[tuple[str, str]]]:
    """The lineage DAG above record `candidate`: its nodes (the candidate first, then by discovery) and edges
    (parent, child), following each record's ``parents`` back to the experts."""
    start = f"record:{candidate}"
    nodes, edges, queue = [start], [], [start]
    while queue:
        node = queue.pop(0)
        if not node.startswith("record:"):
            continue
        parents = records[int(node.split(":", 1)[1])].get("parents", "none")
        for parent in parents if isinstance(parents, list) else []:
            edges.append((parent, node))
            if parent not in nodes:
                nodes.append(parent)
                queue.append(parent)
    return nodes, edges


def _label(node: str, records: dict[int, dict[str, Any]]) -> str:
    if not node.startswith("record:"):
        return node
    record = records[int(node.split(":", 1)[1])]
    fitness = "n/a" if record.get("fitness") is None else f"{record['fitness']:.4f}"
    return f"{node} (generation {record['generation']}, fitness {fitness})"


def ancestry_text(records: dict[int, dict[str, Any]], candidate: int) -> str:
    """The ancestry as an indented tree; a node met again is printed once and then referred to."""
    lines, seen = [], set()

    def walk(node: str, depth: int) -> None:
        repeat = node in seen and node.startswith("record:")
        lines.append("  " * depth + _label(node, records) + (" (above)" if repeat else ""))
        if repeat or not node.startswith("record:"):
            return
        seen.add(node)
        parents = records[int(node.split(":", 1)[1])].get("parents", "none")
        if not isinstance(parents, list):
            lines.append("  " * (depth + 1) + "parents: none (the algorithm does not report them)")
            return
        for parent in parents:
            walk(parent, depth + 1)

    walk(f"record:{candidate}", 0)
    return "\n".join(lines)


def ancestry_dot(records: dict[int, dict[str, Any]], candidate: int) -> str:
    """The ancestry as a Graphviz digraph (parents above children)."""
    nodes, edges = ancestry(records, candidate)
    lines = ["digraph lineage {", "  rankdir=TB;", '  node [shape=box, fontname="Helvetica"];']
    for node in nodes:
        style = ', style=filled, fillcolor="#ffe08a"' if node == f"record:{candidate}" else (
            ', style=filled, fillcolor="#cfe8ff"' if node.startswith("expert:") else "")
        lines.append(f'  "{node}" [label="{_label(node, records)}"{style}];')
    lines += [f'  "{parent}" -> "{child}";' for parent, child in edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def lineage(run_dir: str | Path, candidate: int | None = None, out: str | Path | None = None) -> dict[str, Any]:
    """Print-ready ancestry of a candidate of a run, and its DOT file (and PNG when Graphviz's ``dot`` exists).

    Args:
        candidate: a record id; default the released searched candidate (recipe.json), else the best record.
        out: the DOT file (default ``RUN/lineage-<id>.dot``).

    Returns:
        ``{"candidate", "text", "dot", "png" (or None), "record" (the full evidence record)}``.

    Raises:
        MergeInputError: no run there, or no such candidate.
    """
    from evox_merge.run.monitor import RECORDS_NAME, read_records

    run_dir = Path(run_dir)
    if not (run_dir / RECORDS_NAME).is_file():
        raise MergeInputError(f"RUN: {run_dir} holds no {RECORDS_NAME}; expected a search's output directory")
    records = {r["id"]: r for r in read_records(run_dir / RECORDS_NAME)}
    if not records:
        raise MergeInputError(f"RUN: {run_dir / RECORDS_NAME} is empty")
    if candidate is None:
        recipe_path = run_dir / "recipe.json"
        release = json.loads(recipe_path.read_text(encoding="utf-8"))["release"] if recipe_path.is_file() else {}
        if release.get("kind") == "searched":
            candidate = int(release["settings"]["record"])
        else:
            finite = [r for r in records.values() if r.get("fitness") is not None] or list(records.values())
            candidate = max(finite, key=lambda r: r.get("fitness") or float("-inf"))["id"]
    if candidate not in records:
        raise MergeInputError(f"--candidate: no record {candidate} in {run_dir / RECORDS_NAME} (ids 0 to "
                              f"{max(records)})")
    dot_path = Path(out) if out is not None else run_dir / f"lineage-{candidate}.dot"
    write_text_atomic(dot_path, ancestry_dot(records, candidate))
    png = None
    if shutil.which("dot"):
        png = dot_path.with_suffix(".png")
        subprocess.run(["dot", "-Tpng", str(dot_path), "-o", str(png)], check=True, capture_output=True)
    run_file = run_dir / "run.json"
    run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
    record = full_record(records[candidate], run) if "evidence" in run else records[candidate]
    return {"candidate": candidate, "text": ancestry_text(records, candidate), "dot": dot_path, "png": png,
            "record": record}
