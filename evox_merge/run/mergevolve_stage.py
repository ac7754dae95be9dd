"""The MERGEvolve stage of a search run: evolve the selected release off the experts' span, keep it if it helps.

Runs after the release selection (`evox_merge.run.search`) when the config has ``mergevolve:``. The centre starts
as the selected release's dense delta per target layer; MERGEvolve (`evox_merge.algorithms.mergevolve`) scores the
centre and its antithetic perturbations on the search part, with the run's normalisation; the final centre is then
judged on the selection part (the search part without one) against the release it started from and replaces it
only if it scores higher. Its records go to ``mergevolve_records.jsonl``; recipe.json's ``mergevolve`` section holds
the settings, the per-generation history, both merges' fitness and the final centre's span residual
(`evox_merge.experts.kernel.span_report`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evox_merge.algorithms.mergevolve import MERGEvolve
from evox_merge.experts.kernel import span_report
from evox_merge.experts.spaces import PerturbationSpace
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.static_merges import StaticMerge
from evox_merge.run.loop import search
from evox_merge.run.run_files import MERGEVOLVE_RECORDS as RECORDS
from evox_merge.run.selection import Candidate, score_table, selection_margin
from evox_merge.util.atomic import write_text_atomic


def _fitness(problem: MergeProblem, merge: StaticMerge) -> float:
    return float(problem.aggregate(merge.score(problem).unsqueeze(0))[0])


def mergevolve_stage(config: Any, problem: MergeProblem, selection: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run the stage; updates `selection` (winner, candidates, scores) in place when the centre wins and returns
    recipe.json's ``mergevolve`` section."""
    stage = config.mergevolve
    experts = problem.experts
    start = selection["winner"]
    space = PerturbationSpace(list(experts.layers), experts.expert_names, start.merge.merged_deltas(experts.layers),
                              rank=stage.rank, sigma=stage.sigma)
    evolving = MergeProblem(experts, problem.tasks, batch_size=config.batch_size, batch_tokens=config.batch_tokens,
                            space=space)
    evolving.normalise(problem.normalisation)
    algorithm = MERGEvolve(space, pairs=stage.pairs, learning_rate=stage.learning_rate, seed=config.seed)
    monitor = search(algorithm, evolving, stage.generations)
    write_text_atomic(out / RECORDS, "".join(json.dumps(record) + "\n" for record in monitor.records))
    final = StaticMerge("mergevolve", {"start": start.name, **stage.model_dump()}, deltas=algorithm.centre_deltas())
    splits = selection["splits"]
    judge_split = "selection" if "selection" in splits else "search"
    final.fitness = _fitness(splits["search"], final)
    judged = _fitness(splits[judge_split], final)
    started = _fitness(splits[judge_split], start.merge)
    released = judged > started
    candidate = Candidate("mergevolve", "searched", final, final.fitness,
                          judged if judge_split == "selection" else None)
    selection["candidates"].append(candidate)
    selection["scores"]["mergevolve"] = score_table({"mergevolve": final}, splits)["mergevolve"]
    margin = (selection_margin(candidate, start, splits["selection"], seed=config.seed)
              if judge_split == "selection" else None)
    if released:
        selection["scores"]["mergevolve_start"] = selection["scores"]["release"]
        selection["scores"]["release"] = selection["scores"]["mergevolve"]
        selection["winner"] = candidate
        selection["margin"] = margin
    span = span_report(experts.layers, experts.num_experts, final.deltas)
    return {
        "settings": stage.model_dump(),
        "start": start.name,
        "evaluations": len(monitor.records),
        "records": RECORDS,
        "history": algorithm.history,
        "judged_on": f"{judge_split} part",
        "start_fitness": started,
        "final_fitness": judged,
        "final_search_fitness": final.fitness,
        "released": released,
        "selection_margin": margin,
        "span_residual": span,
    }
