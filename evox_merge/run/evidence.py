"""The evidence record of every candidate, and its ancestry (``evox-merge lineage RUN [--candidate ID]``).

A candidate's evidence is its line in records.jsonl (`evox_merge.run.monitor.EVIDENCE_FIELDS`: id and lineage node,
parents, operator, coefficients, scores, seconds) joined with the run-constant part in run.json's ``evidence``
(`RUN_EVIDENCE_FIELDS`: base family, tokenizer compatibility, operator in words, the experts and their hashes, the
evaluation suite with the task-file hashes, the resource profile's device and dtype, intended use); `full_record`
joins them. Records name their parents as lineage nodes (``record:<id>``, ``expert:<name>``), so the lineage DAG is
the records themselves: `ancestry` walks it from one candidate back to the experts.

The DOT file `lineage` writes ends with a mark (``// written by evox-merge lineage; sha256 <its text>; png <hash>``):
it replaces an existing file, and the PNG beside it, only when that mark proves it wrote them, and never writes over
or into what the run read (`check_lineage_out`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from evox_merge.util.atomic import atomic_path, write_text_atomic
from evox_merge.util.errors import MergeInputError
from evox_merge.util.hashing import file_sha256
from evox_merge.util.ownership import collision, few

RUN_EVIDENCE_FIELDS = ("base_family", "tokenizer_compatibility", "operator_description", "experts",
                       "evaluation_suite", "resource_profile", "intended_use")
_MARK = re.compile(rb"// written by evox-merge lineage; sha256 ([0-9a-f]{64}); png (none|[0-9a-f]{64})\n")
_RUN_FILES = ("records.jsonl", "run.json", "recipe.json", "checkpoint.pt")  # what lineage reads, and the search's


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
        "resource_profile": {"device": device, "dtype": experts.dtype_name,
                             "per_candidate": "each record's 'seconds' (wall time of its evaluation, its "
                                              "population's share)"},
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


def lineage(run_dir: str | Path, candidate: int | None = None, out: str | Path | None = None,
            overwrite: bool = False) -> dict[str, Any]:
    """Print-ready ancestry of a candidate of a run, and its DOT file (and PNG when Graphviz's ``dot`` exists).

    Args:
        candidate: a record id; default the released searched candidate (recipe.json), else the best record.
        out: the DOT file (default ``RUN/lineage-<id>.dot``); the PNG goes beside it (``.png``).
        overwrite: also replace a DOT file or PNG that lineage wrote but that changed since (see
            `check_lineage_out`).

    Returns:
        ``{"candidate", "text", "dot", "png" (or None), "record" (the full evidence record)}``.

    Raises:
        MergeInputError: no run there, or no such candidate; an output it may not replace (`check_lineage_out`;
            an explicit `out` is checked before the records are read).
    """
    run_dir = Path(run_dir)
    if out is not None:
        check_lineage_out(Path(out), run_dir, overwrite)
    from evox_merge.run.monitor import read_records
    from evox_merge.run.output_dir import RECORDS_NAME

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
    if out is None:
        check_lineage_out(dot_path, run_dir, overwrite)
    text = ancestry_dot(records, candidate)
    png = dot_path.with_suffix(".png")
    if shutil.which("dot"):
        with atomic_path(png) as rendered:  # the DOT first (its mark names the new PNG), then the PNG
            subprocess.run(["dot", "-Tpng", "-o", str(rendered)], input=text.encode(), check=True,
                           capture_output=True)
            write_text_atomic(dot_path, text + _mark(text, file_sha256(rendered)))
    else:
        write_text_atomic(dot_path, text + _mark(text, None))
        png.unlink(missing_ok=True)  # lineage's own, checked above: it would not match the new DOT file
        png = None
    run_file = run_dir / "run.json"
    run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
    record = full_record(records[candidate], run) if "evidence" in run else records[candidate]
    return {"candidate": candidate, "text": ancestry_text(records, candidate), "dot": dot_path, "png": png,
            "record": record}


def _mark(text: str, png_sha256: str | None) -> str:
    """The last line of a DOT file lineage writes: the hash of the text above it and of the PNG beside it."""
    return (f"// written by evox-merge lineage; sha256 {hashlib.sha256(text.encode()).hexdigest()}; "
            f"png {png_sha256 or 'none'}\n")


def check_lineage_out(dot: Path, run_dir: Path, overwrite: bool) -> None:
    """Check that lineage may write the DOT file `dot` and the PNG beside it, before anything is written.

    Neither may be or lie inside what the run read (its base, experts, tokenizer and task files as run.json and
    recipe.json name them, and its own files). An existing DOT file is replaced only when it holds lineage's mark
    (its last line as written), the PNG only when that mark records its hash; files lineage wrote but that changed
    since are replaced only with `overwrite`.

    Raises:
        MergeInputError: naming the path, and ``--overwrite`` where it would allow the write.
    """
    png = dot.with_suffix(".png")
    inputs = _run_inputs(run_dir)
    for path in (dot, png):
        hit = collision(path, inputs)
        if hit is not None:
            raise MergeInputError(f"--out: {path} {hit}, which the run read; lineage never writes over or into a "
                                  "run's inputs: choose another --out")
    if dot.is_dir():
        raise MergeInputError(f"--out: {dot} is a directory; expected the path of a DOT file to write")
    lines = dot.read_bytes().splitlines(keepends=True) if dot.is_file() and not dot.is_symlink() else []
    marks = [(index, _MARK.fullmatch(line)) for index, line in enumerate(lines) if _MARK.fullmatch(line)]
    if (dot.exists() or dot.is_symlink()) and not marks:
        raise MergeInputError(f"--out: {dot} exists and was not written by evox-merge lineage (it holds no line "
                              "with lineage's mark); lineage replaces only its own files: choose another --out or "
                              "move that file away")
    changed, mark = [], marks[-1][1] if marks else None
    if marks:  # lineage's, as written if the mark is its last line and the text above it has the recorded hash
        index = marks[-1][0]
        if index != len(lines) - 1 or hashlib.sha256(b"".join(lines[:index])).hexdigest() != mark.group(1).decode():
            changed.append(dot.name)
    if png.exists() or png.is_symlink():
        recorded = mark.group(2).decode() if mark is not None else "none"
        if recorded == "none" or png.is_dir() or png.is_symlink():
            raise MergeInputError(f"--out: {png}, where lineage writes the PNG beside {dot.name}, exists and was not "
                                  f"written by evox-merge lineage (not recorded in {dot.name}); lineage replaces only "
                                  "its own files: choose another --out or move that file away")
        if file_sha256(png) != recorded:
            changed.append(png.name)
    if changed and not overwrite:
        raise MergeInputError(f"--out: {few(changed)} in {dot.parent}, written by evox-merge lineage, changed since; "
                              "pass --overwrite to replace them (the changes are lost), or choose another --out")


def _run_inputs(run_dir: Path) -> list[tuple[str, Path]]:
    """What a run read and wrote, which lineage never writes over or into: its own files and the local paths that
    its run.json config and recipe.json name (base, experts, tokenizer, task files; Hub ids are not paths)."""
    named: list[tuple[str, Any]] = [(f"the run's {name}", (run_dir / name).resolve()) for name in _RUN_FILES]
    try:
        config = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["config"]
        named += [("the run's base", config.get("base")), ("the run's tokenizer", config.get("tokenizer")),
                  *(("one of the run's experts", path) for path in config.get("experts") or []),
                  *(("one of the run's task files", spec.get(key)) for spec in config.get("tasks") or []
                    if isinstance(spec, dict) for key in ("path", "test_path"))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no run.json, or not one a search wrote: recipe.json may still name the inputs
    try:
        recipe = json.loads((run_dir / "recipe.json").read_text(encoding="utf-8"))
        named += [("the run's base", recipe["base_model"]["path"]),
                  *(("one of the run's experts", expert["path"]) for expert in recipe["experts"])]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return [(what, Path(path)) for what, path in named if isinstance(path, (str, Path)) and Path(path).is_absolute()]
