"""The Markdown of `benchmarks.gpu`'s results file: status, card, what else ran, settings, tables, raw JSON."""

from __future__ import annotations

import json


def _number(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary(report) -> dict:
    """Per shape: the best candidates per pass, its speed, its multiple of the FLOP floor, and mergekit-evolve's
    loop against it."""
    out = {}
    peak = report.meta["peak_flops"]
    for label, facts in report.shapes.items():
        rows = [r for r in report.rows if r["shape"] == label and r.get("candidates")]
        if not rows:
            continue
        best = max(rows, key=lambda r: r["candidates_per_s"])
        one = next((r for r in rows if r["per_pass"] == 1), None)
        floor_s = facts["floor_flop"] / peak if peak else None
        loops = [r["seconds"] for r in report.loops if r["shape"] == label]
        loop_s = sum(loops) / len(loops) if loops else None
        out[label] = {
            "best_per_pass": best["per_pass"], "best_candidates_per_s": best["candidates_per_s"],
            "one_per_pass_candidates_per_s": one["candidates_per_s"] if one else None,
            "floor_s_per_candidate": floor_s,
            "best_x_floor": (1 / best["candidates_per_s"]) / floor_s if floor_s else None,
            "mergekit_loop_s_per_candidate": loop_s,
            "speedup_over_mergekit_loop": best["candidates_per_s"] * loop_s if loop_s else None,
            "speedup_over_mergekit_loop_one_per_pass": one["candidates_per_s"] * loop_s if loop_s and one else None,
        }
    return out


def render(report) -> str:
    """The whole results file for `report` (a `benchmarks.gpu.Report`)."""
    meta, peak = report.meta, report.meta["peak_flops"]
    results = summary(report)
    throughput = ["| shape | parameters | candidates per pass | candidates | candidates/s | s/candidate | "
                  "floor s/candidate | x floor | peak GPU GiB | max abs score diff vs first row |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report.rows:
        facts = report.shapes[row["shape"]]
        floor_s = facts["floor_flop"] / peak if peak else None
        if not row.get("candidates"):
            throughput.append(f"| {row['shape']} | {facts['parameters'] / 1e9:.2f} B | {row['per_pass']} | 0 | "
                              f"{row.get('error', 'failed')} | | | | | |")
            continue
        per = row["seconds"] / row["candidates"]
        throughput.append(
            f"| {row['shape']} | {facts['parameters'] / 1e9:.2f} B | {row['per_pass']} | {row['candidates']} | "
            f"{row['candidates_per_s']:.3f} | {per:.3f} | {_number(floor_s, 4)} | "
            f"{_number(per / floor_s if floor_s else None, 1)} | {_number(row['peak_gib'])} | "
            f"{_number(row.get('max_abs_diff_vs_first_row'), 6)} |")
    loops = ["| shape | candidate | s/candidate | merge s | save_pretrained s | load s | score s | "
             "max abs score diff vs in place |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report.loops:
        loops.append(f"| {row['shape']} | {row['candidate']} | {row['seconds']:.2f} | {row['merge_s']:.2f} | "
                     f"{row['save_s']:.2f} | {row['load_s']:.2f} | {row['score_s']:.2f} | "
                     f"{_number(row['max_abs_diff_vs_in_place'], 6)} |")
    lines = []
    for label, s in results.items():
        lines.append(
            f"- **{label}**: best {s['best_candidates_per_s']:.3f} candidates/s at {s['best_per_pass']} per pass "
            f"({_number(s['one_per_pass_candidates_per_s'], 3)} at 1 per pass); "
            f"{_number(s['best_x_floor'], 1)}x the FLOP floor (target for 8B: within 3x); mergekit-evolve's loop "
            f"{_number(s['mergekit_loop_s_per_candidate'])} s/candidate, so "
            f"{_number(s['speedup_over_mergekit_loop'], 1)}x faster (target: >= 10x; one per pass: "
            f"{_number(s['speedup_over_mergekit_loop_one_per_pass'], 1)}x)")
    work = [f"- {label}: {f['parameters'] / 1e9:.2f} B parameters ({f['body_matmul_parameters'] / 1e9:.2f} B in the "
            f"body's matmuls, {f['head_parameters'] / 1e6:.0f} M in the output layer), {f['dtype']}; per candidate "
            f"{f['body_tokens']} tokens read, {f['head_tokens']} positions scored, floor "
            f"{f['floor_flop'] / 1e12:.2f} TFLOP; setup: built {f['build_s']:.1f} s, base saved {f['save_base_s']:.1f} "
            f"s, adapters {f['adapters_s']:.1f} s, ExpertSet.load {f['load_s']:.1f} s"
            for label, f in report.shapes.items()]
    raw = {"status": report.status, "meta": meta, "shapes": report.shapes, "rows": report.rows,
           "mergekit_loop": report.loops, "skipped": report.skipped, "summary": results}
    settings = meta["settings"]
    note = f"; note: {meta['note']}" if meta["note"] else ""
    return f"""# GPU benchmark: 1B- and 8B-shaped models against the FLOP floor and mergekit-evolve's loop

Status: {report.status}

Command: `{meta['command']}`. Card: **{meta['card']}**; peak: {meta['peak_source']}.
What else ran: other GPU processes: {meta['other_gpu_processes']}; load average (1, 5, 15 min) at the start
{_load(meta.get('load_at_start'))}, at the end {_load(meta.get('load_at_end'))}{note}.

Settings: {settings['dtype']} (`dtype: auto` resolves to the first row's dtype below), batch size
{settings['batch_size']} rows, {settings['population']} random candidates per row (uniform in [-1, 1]; more when
the candidates per pass are more), warm-up of one pass per row, {settings['examples']} examples per task (multiple
choice with 4 choices, generation with max_new_tokens {settings['new_tokens']}, language modelling), each after a
5-shot prefix shared by its examples; 8 LoRA experts (rank, targets): {meta['experts']}; budget
{settings['budget_s']:.0f} s. `benchmarks/gpu.py` builds everything from a `LlamaConfig` with random weights
(shapes in the JSON below) and a character tokenizer filling the model's whole vocabulary.

{chr(10).join(work)}

## Summary

{chr(10).join(lines) or '- no shape finished yet'}

## Candidates per second (`MergeProblem.evaluate_per_task`, synchronised wall clock)

The floor is `2 x (body matmul parameters x tokens read + output-layer parameters x positions scored)` at the
card's dense bf16 peak; x floor = seconds per candidate over it. The last column compares each row's scores with
the first row's on the same candidates (several per pass runs the factors unmerged: rounding differs in bf16).

{chr(10).join(throughput)}

## mergekit-evolve's loop on the same GPU and work

Per candidate: merge into the full model (our in-place kernel), `save_pretrained` to local disk, load it back
(`from_pretrained`, to the GPU), score it with the same prepared scorers (no tokenisation counted: this flatters the
loop).

{chr(10).join(loops)}

Skipped for time: {'; '.join(report.skipped) if report.skipped else 'nothing'}.

## Raw numbers

```json
{json.dumps(raw, indent=1, default=str)}
```
"""


def _load(value) -> str:
    return "n/a" if value is None else " / ".join(f"{x:.2f}" for x in value)
