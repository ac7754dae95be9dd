"""What a person reads after a search: history.csv, PNG plots and the model card (README.md)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from evox_merge.util.atomic import atomic_path, write_text_atomic  # noqa: E402


def write_history_csv(records: list[dict[str, Any]], expert_names: list[str], path: str | Path,
                      hypervolume: dict[int, float] | None = None) -> None:
    """One row per evaluated candidate: id, generation, fitness, per-task scores, coefficients; with
    `hypervolume` (pareto objectives: generation -> the archive's hypervolume after it) also each objective's value
    and the hypervolume after the candidate's generation."""
    task_names = list(records[0]["task_scores"]) if records else []
    objective_names = list(records[0].get("objectives", {})) if records and hypervolume is not None else []
    extra = [*[f"objective_{n}" for n in objective_names], "hypervolume"] if hypervolume is not None else []
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "generation", "round", "fitness", *task_names, *[f"c_{n}" for n in expert_names],
                         *extra])
        for record in records:
            row = [record["id"], record["generation"], record.get("round", ""), record["fitness"],
                   *[record["task_scores"][name] for name in task_names], *record["coefficients"]]
            if hypervolume is not None:
                row += [record["objectives"][name] for name in objective_names] + [hypervolume[record["generation"]]]
            writer.writerow(row)


def _fitness(record: dict[str, Any]) -> float:
    return record["fitness"] if record["fitness"] is not None else -math.inf


def plot_fitness(records: list[dict[str, Any]], path: str | Path) -> None:
    """Best-so-far and per-generation median fitness against evaluations."""
    best, best_curve = -math.inf, []
    for record in records:
        best = max(best, _fitness(record))
        best_curve.append(best)
    generations: dict[int, list[float]] = {}
    for record in records:
        if record["fitness"] is not None:
            generations.setdefault(record["generation"], []).append(record["fitness"])
    ends, medians, count = [], [], 0
    for generation in sorted(generations):
        count = max(r["id"] for r in records if r["generation"] == generation) + 1
        values = sorted(generations[generation])
        ends.append(count)
        medians.append(values[len(values) // 2])
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(range(1, len(best_curve) + 1), best_curve, label="best so far")
    axis.plot(ends, medians, marker="o", linestyle="--", label="generation median")
    axis.set_xlabel("evaluations")
    axis.set_ylabel("validation fitness (higher is better)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_coefficients(records: list[dict[str, Any]], expert_names: list[str], path: str | Path) -> None:
    """The coefficients of the best-so-far candidate against evaluations, one line per expert."""
    best, trajectory = -math.inf, []
    current = None
    for record in records:
        if _fitness(record) > best or current is None:
            best, current = _fitness(record), record["coefficients"]
        trajectory.append(current)
    figure, axis = plt.subplots(figsize=(7, 4))
    for index, name in enumerate(expert_names):
        axis.plot(range(1, len(trajectory) + 1), [row[index] for row in trajectory], label=name)
    axis.set_xlabel("evaluations")
    axis.set_ylabel("coefficient of the best candidate so far")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_layer_coefficients(coefficients: list[float], group_names: list[str], expert_names: list[str],
                            path: str | Path, title: str) -> None:
    """A layer-space candidate as a heatmap: one row per group of layers, one column per expert."""
    import numpy as np

    grid = np.asarray(coefficients, dtype=float).reshape(len(group_names), len(expert_names))
    limit = max(float(np.abs(grid).max()), 1e-9)
    figure, axis = plt.subplots(figsize=(1.2 + 0.8 * len(expert_names), 1.2 + 0.5 * len(group_names)))
    image = axis.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    axis.set_xticks(range(len(expert_names)), expert_names, rotation=45, ha="right", fontsize=7)
    axis.set_yticks(range(len(group_names)), group_names, fontsize=7)
    for (row, column), value in np.ndenumerate(grid):
        axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=6)
    figure.colorbar(image, ax=axis, label="coefficient")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_task_scores(scores: dict[str, dict[str, float]], path: str | Path, title: str) -> None:
    """Grouped bars: per task, the score of each merge (``scores[merge][task]``)."""
    merges = list(scores)
    tasks = list(next(iter(scores.values())))
    width = 0.8 / len(merges)
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(tasks) + 2), 4))
    for index, merge in enumerate(merges):
        positions = [t + index * width for t in range(len(tasks))]
        axis.bar(positions, [scores[merge][task] for task in tasks], width, label=merge)
    axis.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=30, ha="right")
    axis.set_ylabel("score")
    axis.set_title(title)
    axis.legend(fontsize=7)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_pareto_front(records: list[dict[str, Any]], names: list[str], archive: list[dict[str, Any]],
                      statics: dict[str, list[float]], released: list[dict[str, Any]], champion: dict[str, float],
                      path: str | Path) -> None:
    """The front on the search part: every record (grey), the archive, the released members (labelled), the champion
    and the static merges. A scatter per objective pair for 2 or 3 objectives, parallel coordinates beyond."""
    def row(values: dict[str, Any]) -> list[float]:
        return [math.nan if values.get(n) is None else values[n] for n in names]

    every = [row(r.get("objectives", {})) for r in records]
    front = [row(r["objectives"]) for r in archive]
    members = [(m["folder"], row(m["objectives"]["search"])) for m in released]
    champ = row(champion)
    if len(names) <= 3:
        pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))] or [(0, 0)]
        figure, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.5), squeeze=False)
        for axis, (i, j) in zip(axes[0], pairs):
            axis.scatter([p[i] for p in every], [p[j] for p in every], s=8, c="0.75", label="evaluated")
            axis.scatter([p[i] for p in front], [p[j] for p in front], s=22, c="tab:blue", label="archive")
            for name, values in statics.items():
                axis.scatter(values[i], values[j], marker="s", s=30, label=f"static: {name}")
            for folder, values in members:
                axis.scatter(values[i], values[j], marker="^", s=60, edgecolors="k")
                axis.annotate(folder, (values[i], values[j]), fontsize=6, xytext=(3, 3), textcoords="offset points")
            axis.scatter(champ[i], champ[j], marker="*", s=160, c="gold", edgecolors="k", label="champion")
            axis.set_xlabel(names[i])
            axis.set_ylabel(names[j])
            axis.grid(alpha=0.3)
        axes[0][0].legend(fontsize=6)
    else:
        figure, axis = plt.subplots(figsize=(max(7, 1.1 * len(names)), 4.5))
        xs = list(range(len(names)))
        for values in every:
            axis.plot(xs, values, c="0.85", lw=0.5)
        for values in front:
            axis.plot(xs, values, c="tab:blue", lw=0.8, alpha=0.6)
        for name, values in statics.items():
            axis.plot(xs, values, lw=1.5, ls="--", label=f"static: {name}")
        for folder, values in members:
            axis.plot(xs, values, lw=1.5, label=folder)
        axis.plot(xs, champ, lw=2.5, c="gold", label="champion")
        axis.set_xticks(xs, names, rotation=30, ha="right")
        axis.set_ylabel("normalised objective (search part)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6, ncol=2)
    figure.suptitle("Pareto front on the search part (higher is better; 0 = base, 1 = best single expert)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def pareto_card_section(pareto: dict[str, Any]) -> str:
    """The model card's section on the Pareto release: one subsection per released model."""
    names = pareto["objectives"]["names"]

    def table(values: dict[str, dict[str, float]]) -> str:
        lines = [f"| split | {' | '.join(names)} |", f"| --- | {' | '.join('---' for _ in names)} |"]
        for split, row in values.items():
            lines.append(f"| {split} | " + " | ".join("" if row.get(n) is None or math.isnan(row[n]) else
                                                      f"{row[n]:.4f}" for n in names) + " |")
        return "\n".join(lines)

    parts = [f"""## Pareto release
Objectives (normalised, higher is better): {', '.join(f'`{n}`' for n in names)}. The run's non-dominated archive
holds {len(pareto['archive'])} candidates; the front is drawn in `pareto_front.png` with the static merges.

### champion/ (`{pareto['champion']['name']}`)
{pareto['champion']['rule']}.

{table(pareto['champion']['objectives'])}
"""]
    for member in pareto["members"]:
        coefficients = ", ".join(f"{c:+.3f}" for c in member["coefficients"])
        parts.append(f"""### {member['folder']}/ (`record:{member['record']}`, {member['role']})
Chosen on the {member['chosen_on']}; coefficients [{coefficients}]; parents {member['parents']}; load
`{member['adapter']}`; its recipe: `{member['folder']}/recipe.json`.

{table(member['objectives'])}
""")
    return "\n".join(parts) + "\n![pareto front](pareto_front.png)\n"


def margin_sentence(margin: dict[str, Any] | None, released: str) -> str | None:
    """One line for people: the release's selection margin (`evox_merge.run.selection.selection_margin`) and
    whether it means anything."""
    if margin is None:
        return None
    if margin["margin"] is None:
        return f"{released} against {margin['over']} on the selection part: not finite, no margin."
    low, high = margin["ci95"]
    examples = sum(margin["examples"].values())
    verdict = ("above the resampling noise, though optimistic: the winner was picked on these same examples"
               if margin["distinguishable"] else
               "within noise: this many selection examples cannot tell them apart (a larger selection part could)")
    sentence = (f"{released} beat {margin['over']} on the selection part by {margin['margin']:+.4f} fitness "
                f"(95% paired bootstrap interval {low:+.4f} .. {high:+.4f}, {examples} examples): {verdict}.")
    oob = margin.get("out_of_bag")
    if oob is not None:
        sentence += (f" Out of bag (the contest rerun on {oob['resamples']} resamples of the selection part, each "
                     f"judged on the examples it left out), the contest is expected to gain {oob['gain']:+.4f} "
                     f"fitness over releasing the best static merge (a searched candidate won "
                     f"{oob['searched_won_share']:.0%} of the resamples).")
    return sentence


def _verdict(recipe: dict[str, Any]) -> str:
    """Plain sentences on what was released, why, and how clearly it won (`selection_margin`)."""
    release, selection = recipe["release"], recipe["selection"]
    if release.get("rule_overrode"):
        contest_winner = release["contest_winner"]
        margin = margin_sentence(release.get("selection_margin"), f"`{contest_winner}`")
        return (f"**The release is the static merge `{release['name']}`: the searched candidate `{contest_winner}` "
                f"won the selection contest, but not clearly, and the release rule `{release['rule']}` releases a "
                f"searched candidate only when it wins clearly.** {margin}")
    if release["static_merge_won"]:
        verdict = (f"**A static merge won: this release is `{release['name']}`, not a searched candidate.** On the "
                   f"selection part (examples the search never saw) it beat the search's {selection['top_k']} best "
                   f"candidates (best of them: `{selection['best_searched']}`); see the table below.")
    else:
        verdict = (f"The release is the searched candidate `{release['name']}`, chosen on the {release['chosen_on']} "
                   "against the static merges in the table below.")
    margin = margin_sentence(release.get("selection_margin"), f"`{release['name']}`")
    return verdict if margin is None else f"{verdict} {margin}"


SEARCH_SIZE_EVIDENCE = (
    "On evox-merge's tiny zoo (benchmarks/results/learning_curve.md in its repository) searches beat tuned task "
    "arithmetic on a 10-task merge only from 64 search examples per task on, and the best static merge on single "
    "tasks only from 32; with fewer, a searched release is expected to do no better on new examples than a static "
    "merge.")


def search_size_note(evaluation: dict[str, Any]) -> str:
    """How many examples per task the search scored candidates on, beside what the learning curve says that
    takes (`SEARCH_SIZE_EVIDENCE`); empty for a recipe that did not record it."""
    counts = (evaluation.get("examples") or {}).get("search")
    if not counts:
        return ""
    low, high = min(counts.values()), max(counts.values())
    size = str(low) if low == high else f"{low}-{high}"
    note = f"The search scored candidates on {size} examples per task. {SEARCH_SIZE_EVIDENCE}"
    if low < 32:
        note += " This run had fewer on some task: more validation examples would make its choice more trustworthy."
    return note + "\n"


def model_card(recipe: dict[str, Any]) -> str:
    """A Markdown model card generated from the recipe."""
    release = recipe["release"]
    suite = recipe["evaluation"]
    experts = recipe["experts"]
    rows = []
    for merge, splits in suite["scores"].items():
        for split, tasks in splits.items():
            cells = ["" if tasks.get(t) is None else f"{tasks[t]:.4f}" for t in [*suite["tasks"], "mean", "normalised"]]
            rows.append(f"| {merge} | {split} | " + " | ".join(cells) + " |")
    if release["coefficients"] is not None:
        merge_text = "Coefficients in the original expert basis:\n\n| expert | coefficient | sha256 |\n| --- | --- | --- |\n"
        merge_text += "\n".join(f"| {expert['name']} | {c:+.4f} | `{expert['sha256'][:12]}` |"
                                for expert, c in zip(experts, release["coefficients"]))
    else:
        merge_text = f"Settings: `{release['settings']}`; experts: " + ", ".join(
            f"{expert['name']} (`{expert['sha256'][:12]}`)" for expert in experts)
    columns = [*suite["tasks"], "mean", "normalised"]
    return f"""# Merged model: {recipe['name']}

Made by evox-merge {recipe['versions']['evox_merge']} with `{recipe['search']['algorithm']}` from the base
`{recipe['base_model']['path']}` (sha256 `{recipe['base_model']['sha256'][:12]}`) and {_expert_kinds(experts)}.

{_verdict(recipe)}
{_warnings(recipe)}
**Intended use:** {recipe['intended_use']}

## How to load it
{_how_to_load(recipe)}

## Merge
Operator: {recipe['operator']}. {merge_text}

## Evaluation
Splits: `search` = the examples the search scored candidates on; `selection` = held out from the search, chose the
release; `test` = {_test_split(suite)}. `mean` is the weighted mean of raw scores; `normalised` the
fitness the search used ({recipe['normalisation']['mode']}: 0 = base model, 1 = best single expert per task).
`best_searched` is the search's best candidate on the selection part (the algorithm alone).
{search_size_note(suite)}
| merge | split | {' | '.join(columns)} |
| --- | --- | {' | '.join('---' for _ in columns)} |
{chr(10).join(rows)}

## Search
{recipe['search']['evaluations']} evaluations in {recipe['resources']['wall_seconds']:.1f} s on {recipe['resources']['device']}
(peak memory {recipe['resources']['peak_memory_mb']:.0f} MB). Every candidate is in `records.jsonl` and `history.csv`;
the full provenance is in `recipe.json`.

![fitness](fitness.png)
![coefficients](coefficients.png)
![task scores](task_scores.png)
""" + (f"\n{pareto_card_section(recipe['pareto'])}" if "pareto" in recipe else "")


def _warnings(recipe: dict[str, Any]) -> str:
    """The recipe's warnings as a list under the verdict (an empty line without any)."""
    warnings = recipe.get("warnings") or []
    return "".join(f"\n**Warning:** {warning}.\n" for warning in warnings)


def _test_split(evaluation: dict[str, Any]) -> str:
    """What the test split is: held out, or (where test examples are also validation examples) how far it is not."""
    overlap = evaluation.get("test_overlap") or {}
    if not overlap:
        return "never used to choose anything"
    counts = ", ".join(f"{o['also_in_validation']} of {o['test_examples']} in `{name}`" for name, o in overlap.items())
    return (f"the tasks' test files, **not fully held out**: some test examples are also validation examples, which "
            f"chose the release ({counts}), so test overstates how the release does on unseen examples")


def _expert_kinds(experts: list[dict]) -> str:
    """``6 LoRA experts``, ``6 dense (fully fine-tuned) experts`` or a mix of both."""
    dense = sum(e.get("kind") == "dense" for e in experts)
    parts = [f"{len(experts) - dense} LoRA"] * (dense < len(experts)) + [f"{dense} dense (fully fine-tuned)"] * (dense > 0)
    return " and ".join(parts) + " experts"


def _how_to_load(recipe: dict) -> str:
    """The Python that loads the release: the adapter on the base, or the full model (dense experts' merges)."""
    files, auto = recipe["release_files"], recipe["base_model"].get("auto_class", "AutoModelForCausalLM")
    if files.get("adapter"):
        return f"""```python
from peft import PeftModel
from transformers import {auto}
base = {auto}.from_pretrained("{recipe['base_model']['path']}")
model = PeftModel.from_pretrained(base, "{files['adapter']}")
```"""
    return f"""```python
from transformers import {auto}
model = {auto}.from_pretrained("{files['full_model']}")
```"""


def write_model_card(recipe: dict[str, Any], path: str | Path) -> None:
    """Write `model_card(recipe)` atomically."""
    write_text_atomic(path, model_card(recipe))
