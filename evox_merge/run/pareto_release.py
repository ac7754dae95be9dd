"""The Pareto release (``objectives: pareto``): champion, specialists and challengers from the run's archive.

* **archive**: the records that no other record dominates on the search part's objective values (the whole run;
  `evox_merge.run.objectives.run_archive`), distinct coefficient vectors only. When it holds more than
  `MAX_MEMBERS`, the members kept are the first of `pareto_order` (the most spread, by crowding distance).
* **champion/**: chosen exactly as the ``best/`` release of ``objectives: mean`` (`evox_merge.run.selection`): the
  best normalised mean on the selection part among the search's top-k and the static merges. Written by the search.
* **specialists/<objective>/**: per objective, the archive member with the best value of that objective on the
  selection part (on the search part when there is none); the folder is the objective's name made a folder name
  (`evox_merge.run.config.objective_folder`), which the config check keeps distinct and inside ``specialists/``.
* **challengers/<n>/**: up to ``challengers`` of the remaining archive members, non-dominated among them on the
  selection part, the most spread first (largest crowding distance).

Every member is a PEFT adapter (``adapter/``) with its own recipe.json (the run's recipe with its own release,
scores and objective values) and is scored on every split like the champion. The front is drawn in
``pareto_front.png`` with the static merges on it (`evox_merge.run.report.plot_pareto_front`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from evox_merge.algorithms.pareto import non_dominated_rank, pareto_order
from evox_merge.problems.static_merges import StaticMerge
from evox_merge.run.config import objective_folder
from evox_merge.run.objectives import Objectives, objective_matrix, run_archive
from evox_merge.run.release import write_merge
from evox_merge.run.report import plot_pareto_front
from evox_merge.run.selection import score_table
from evox_merge.util.atomic import write_text_atomic

MAX_MEMBERS = 24


def archive_members(records: list[dict[str, Any]], objectives: Objectives) -> list[dict[str, Any]]:
    """The archive's records (distinct coefficients, at most `MAX_MEMBERS`, most spread first when cut)."""
    by_id = {r["id"]: r for r in records}
    members, seen = [], set()
    for identifier in run_archive(records, objectives.names).ids:
        key = tuple(by_id[identifier]["coefficients"])
        if key not in seen:
            seen.add(key)
            members.append(by_id[identifier])
    if len(members) > MAX_MEMBERS:
        order = pareto_order(-objective_matrix(members, objectives.names))
        members = [members[i] for i in order[:MAX_MEMBERS].tolist()]
    return members


def _choose(values: torch.Tensor, objectives: Objectives, exclude: set[int]) -> list[tuple[str, str, int]]:
    """(role, folder, member index): the specialist of each objective, then the challengers."""
    chosen = []
    for m, name in enumerate(objectives.names):
        column = values[:, m].nan_to_num(nan=-torch.inf)
        chosen.append(("specialist", f"specialists/{objective_folder(name)}", int(torch.argmax(column))))
    taken = {index for _, _, index in chosen} | exclude
    rest = [i for i in range(len(values)) if i not in taken]
    if rest and objectives.challengers:
        rank = non_dominated_rank(-values[rest])
        front = [rest[i] for i in pareto_order(-values[rest]).tolist() if rank[i] == 0]
        for n, index in enumerate(front[: objectives.challengers]):
            chosen.append(("challenger", f"challengers/{n}", index))
    return chosen


def release_pareto(config: Any, problem: Any, splits: dict[str, Any], records: list[dict[str, Any]],
                   objectives: Objectives, selection: dict[str, Any], recipe: dict[str, Any],
                   out: Path) -> dict[str, Any]:
    """Write the specialists and challengers (the champion is written by the search), the front plot, and return
    the ``pareto`` section of recipe.json."""
    members = archive_members(records, objectives)
    judge_split = "selection" if "selection" in splits else "search"
    judge = splits[judge_split]
    merges = [StaticMerge(f"record:{r['id']}", {"record": r["id"], "coefficients": r["coefficients"]},
                          fitness=r["fitness"] if r["fitness"] is not None else float("nan"),
                          coefficients=torch.tensor(r["coefficients"]),
                          space=None if problem.space.kind == "expert" else problem.space) for r in members]
    judged = torch.stack([objectives.values(judge, m.score(judge).unsqueeze(0))[0] for m in merges]) if merges else (
        torch.empty(0, len(objectives.names), dtype=torch.float64))
    winner = selection["winner"]
    champion_record = winner.merge.settings.get("record") if winner.kind == "searched" else None
    exclude = {i for i, r in enumerate(members) if r["id"] == champion_record}
    released = []
    for role, folder, index in (_choose(judged, objectives, exclude) if len(members) else []):
        record, merge = members[index], merges[index]
        adapter_info = write_merge(problem.experts, merge, out / folder, config.release.adapter_rank)
        scores = score_table({folder: merge}, splits)[folder]
        values = {split: dict(zip(objectives.names, objectives.values(
            splits[split], torch.tensor([[scores[split][t] if scores[split][t] is not None else float("nan")
                                          for t in problem.task_names]]))[0].tolist())) for split in scores}
        member = {"role": role, "folder": folder, "record": record["id"], "coefficients": record["coefficients"],
                  "parents": record.get("parents", "none"), "objective": folder.split("/", 1)[1]
                  if role == "specialist" else None, "objectives": values, "scores": scores,
                  "chosen_on": f"{judge_split} part", "adapter": f"{folder}/adapter",
                  "adapter_compression": adapter_info}
        released.append(member)
        own = copy.deepcopy(recipe)
        own.pop("pareto", None)
        own["name"] = f"{recipe['name']}-{folder.replace('/', '-')}"
        own["release"] = {"name": merge.name, "kind": "searched", "role": role, "settings": merge.settings,
                          "coefficients": record["coefficients"], "chosen_on": member["chosen_on"],
                          "rule": _RULES[role], "static_merge_won": False}
        own["evaluation"]["scores"] = {"release": scores}
        own["objectives"] = values
        dense = bool(problem.experts.dense)  # dense experts' merges are released as full models only
        own["release_files"] = {"adapter": None if dense else "adapter", "full_model": "model" if dense else None,
                                "adapter_compression": adapter_info}
        own["evidence_record"] = record
        write_text_atomic(out / folder / "recipe.json", json.dumps(own, indent=2))
    champion_values = {split: dict(zip(objectives.names, objectives.values(splits[split], torch.tensor([[
        v if (v := selection["scores"]["release"][split][t]) is not None else float("nan")
        for t in problem.task_names]]))[0].tolist())) for split in selection["scores"]["release"]}
    statics = {name: objectives.values(splits["search"], torch.tensor([[
        v if (v := selection["scores"][name]["search"][t]) is not None else float("nan")
        for t in problem.task_names]]))[0].tolist()
        for name in selection["scores"] if name not in ("release", "best_searched")}
    plot_pareto_front(records, list(objectives.names), members, statics, released,
                      champion_values["search"], out / "pareto_front.png")
    return {
        "objectives": objectives.to_dict(),
        "archive": [{"record": r["id"], "objectives": r["objectives"]} for r in members],
        "champion": {"folder": "champion", "name": winner.name, "objectives": champion_values,
                     "rule": _RULES["champion"]},
        "members": released,
        "plot": "pareto_front.png",
    }


_RULES = {
    "champion": "best normalised mean on the selection part among the search's top-k and the static merges "
                "(as the release of objectives: mean)",
    "specialist": "the archive member best on this objective on the selection part (search part without one)",
    "challenger": "non-dominated among the archive members left after the champion and specialists, on the "
                  "selection part; the most spread first (crowding distance)",
}
