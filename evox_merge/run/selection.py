"""Release selection: which merge a run releases, chosen on examples the search never saw, and the score table.

Each validation file is split into a *search part* (the search's fitness) and a *selection part*
(`evox_merge.tasks.split_task`). The release is the best, on the selection part, of the search's top-k distinct
candidates (ranked on the search part) and the static merges (`evox_merge.problems.static_merges`, each tuned on
the search part). Search-part scores only decide which searched candidates enter the contest, never the winner, so a
search that overfits its examples loses to a static merge rather than being released. Without a selection part
(``selection_fraction: 0``) the best searched candidate is released, as the paper does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.static_merges import StaticMerge, tune_static_merge
from evox_merge.run.config import RELEASE_RULES

Scores = dict[str, dict[str, dict[str, float | None]]]


@dataclass
class Candidate:
    """A merge that may be released.

    Attributes:
        name: ``record:<id>`` for a searched candidate, else the static merge's name.
        kind: ``searched`` or ``static``.
        merge: its coefficients (or dense deltas for TIES/DARE) and settings.
        search_fitness: its fitness on the search part.
        selection_fitness: its fitness on the selection part (None until scored, or without a selection part).
        selection_parts: per task its per-example ``(numerators, denominators)`` on the selection part, recorded
            while `select_release` scored it (`MergeProblem.recording_example_parts`).
    """

    name: str
    kind: str
    merge: StaticMerge
    search_fitness: float
    selection_fitness: float | None = None
    selection_parts: list | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """For recipe.json."""
        return {"name": self.name, "kind": self.kind, "settings": self.merge.settings,
                "search_fitness": _finite(self.search_fitness), "selection_fitness": _finite(self.selection_fitness)}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def searched_candidates(records: list[dict[str, Any]], top_k: int, space: Any = None) -> list[Candidate]:
    """The `top_k` records with the best finite search fitness, distinct coefficient vectors only, best first
    (the earlier record first on ties); `space`: the search space their coefficients are in (None: experts)."""
    finite = sorted((r for r in records if r["fitness"] is not None), key=lambda r: -r["fitness"])
    chosen, seen = [], set()
    for record in finite:
        key = tuple(record["coefficients"])
        if key in seen:
            continue
        seen.add(key)
        merge = StaticMerge(f"record:{record['id']}", {"record": record["id"], "coefficients": record["coefficients"]},
                            fitness=record["fitness"], coefficients=torch.tensor(record["coefficients"]), space=space)
        chosen.append(Candidate(merge.name, "searched", merge, record["fitness"]))
        if len(chosen) == top_k:
            break
    return chosen


def static_candidates(search_problem: MergeProblem, names: Sequence[str], seed: int = 0,
                      progress: tqdm | None = None) -> list[Candidate]:
    """The static merges `names`, each tuned on the search part."""
    candidates = []
    for name in names:
        if progress is not None:
            progress.set_postfix_str(f"tuning {name} on the search part")
        merge = tune_static_merge(name, search_problem, seed=seed)
        candidates.append(Candidate(name, "static", merge, merge.fitness))
        if progress is not None:
            progress.update()
    return candidates


def select_release(candidates: list[Candidate], selection_problem: MergeProblem | None,
                   progress: tqdm | None = None) -> Candidate:
    """Score every candidate on the selection part (those not scored yet) and return the best. An exact tie goes to
    the simpler merge: a static merge before a searched candidate, else the first listed (`tied_with` names the
    others).

    Without a selection problem the best searched candidate (by search fitness) is returned.
    """
    if selection_problem is None:
        searched = [c for c in candidates if c.kind == "searched"]
        return max(searched or candidates, key=lambda c: c.search_fitness)
    for candidate in candidates:
        if candidate.selection_fitness is not None:
            continue  # already scored on this selection part (e.g. the searched candidates of the release contest)
        if progress is not None:
            progress.set_postfix_str(f"selection part: {candidate.name}")
        with selection_problem.recording_example_parts() as parts:  # for the margin and the out-of-bag estimate
            scores = candidate.merge.score(selection_problem)
        candidate.selection_parts = parts
        candidate.selection_fitness = float(selection_problem.aggregate(scores.unsqueeze(0))[0])
        if progress is not None:
            progress.update()
    best = -math.inf
    winner = candidates[0]
    for candidate in candidates:
        simpler = candidate.kind == "static" and winner.kind == "searched"
        if candidate.selection_fitness > best or (candidate.selection_fitness == best and simpler):
            best, winner = candidate.selection_fitness, candidate
    return winner


def tied_with(winner: Candidate, candidates: list[Candidate]) -> list[str]:
    """The other candidates whose selection fitness equals the winner's exactly (the contest broke a tie)."""
    return [c.name for c in candidates
            if c is not winner and c.selection_fitness is not None and c.selection_fitness == winner.selection_fitness]


MARGIN_RESAMPLES = 2000
"""Bootstrap resamples of the selection part behind `selection_margin`."""


def release_rival(winner: Candidate, candidates: list[Candidate]) -> Candidate | None:
    """The release's closest rival of the other kind, on the selection part: the best static merge when a searched
    candidate won, the best searched one when a static merge won (None if there is none)."""
    rivals = [c for c in candidates if c.kind != winner.kind and c.selection_fitness is not None]
    return max(rivals, key=lambda c: c.selection_fitness) if rivals else None


def selection_margin(winner: Candidate, rival: Candidate | None, selection_problem: MergeProblem,
                     resamples: int = MARGIN_RESAMPLES, seed: int = 0) -> dict[str, Any] | None:
    """How clearly `winner` beat `rival` (e.g. `release_rival`) on the selection part: the difference of their
    selection fitness with a 95% paired bootstrap interval: the selection part's examples resampled with
    replacement within each task, the same resample for both merges, each task's score recomputed from its
    per-example parts (`MergeProblem.recording_example_parts`) and the fitness from them (the problem's
    normalisation and task weights). An interval that contains 0 says that this many selection examples cannot
    tell the two merges apart; one above 0 is optimistic when `winner` was picked on these same examples (the
    winner's curse: the best of several candidates on a sample is better on it than elsewhere), so it is a warning
    when it fails, not proof when it holds. None without a rival; values None when a score is not finite."""
    if rival is None:
        return None
    parts = [_selection_parts(candidate, selection_problem) for candidate in (winner, rival)]
    observed = [torch.tensor([float(num.sum() / den.sum()) for num, den in recorded], dtype=torch.float64)
                for recorded in parts]  # each task's score from its parts
    resampled, _ = _resampled_task_scores(parts, resamples, seed)
    fitness = _fitness_of(selection_problem)
    differences = fitness(resampled[:, 0]) - fitness(resampled[:, 1])
    margin = float(fitness(torch.stack(observed)) @ torch.tensor([1.0, -1.0], dtype=torch.float64))
    finite = math.isfinite(margin) and bool(torch.isfinite(differences).all())
    low, high = (torch.quantile(differences, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist() if finite
                 else (None, None))
    return {"over": rival.name, "margin": margin if finite else None, "ci95": [low, high],
            "rival_as_good_share": float((differences <= 0).double().mean()) if finite else None,
            "distinguishable": bool(finite and low > 0), "resamples": resamples,
            "examples": {name: int(num.numel()) for name, (num, _) in zip(selection_problem.task_names, parts[0])}}


def _fitness_of(problem: MergeProblem):
    """Raw task scores ``(..., K)`` -> the problem's fitness ``(...)`` (normalised, weighted), in float64; a NaN
    task score stays NaN (the problem's `aggregate` masks it instead)."""
    return lambda task_scores: problem.normalisation.apply(task_scores) @ problem.task_weights.double()


def _resampled_task_scores(parts: list[list], resamples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bootstrap resamples of the selection part, the same for every candidate: per task its examples drawn with
    replacement. `parts`: per candidate its per-task ``(numerators, denominators)``. Returns each candidate's task
    scores ``(B, C, K)`` on each resample (the bag) and on the examples the resample left out (NaN where a task
    left none out)."""
    generator = torch.Generator().manual_seed(seed)
    tasks = len(parts[0])
    in_bag = torch.empty(resamples, len(parts), tasks, dtype=torch.float64)
    left_out_scores = torch.empty_like(in_bag)
    for k in range(tasks):
        numerators = torch.stack([p[k][0].double() for p in parts])  # (C, n)
        denominators = torch.stack([p[k][1].double() for p in parts])
        n = numerators.shape[1]
        counts = torch.zeros(resamples, n, dtype=torch.float64)
        counts.scatter_add_(1, torch.randint(n, (resamples, n), generator=generator),
                            torch.ones(resamples, n, dtype=torch.float64))
        left_out = (counts == 0).double()
        in_bag[:, :, k] = (counts @ numerators.T) / (counts @ denominators.T)
        left_out_scores[:, :, k] = (left_out @ numerators.T) / (left_out @ denominators.T)
    return in_bag, left_out_scores


def _selection_parts(candidate: Candidate, selection_problem: MergeProblem) -> list:
    """The candidate's per-example parts on the selection part: those recorded in the contest, else scored now."""
    if candidate.selection_parts is not None:
        return candidate.selection_parts
    with selection_problem.recording_example_parts() as parts:
        candidate.merge.score(selection_problem)
    return parts


def contest_out_of_bag(candidates: list[Candidate], selection_problem: MergeProblem,
                       resamples: int = MARGIN_RESAMPLES, seed: int = 0) -> dict[str, Any] | None:
    """What the selection contest is expected to gain, on examples it has not seen, over releasing the best static
    merge: an out-of-bag estimate free of the winner's curse that biases `selection_margin`.

    Each resample draws every task's selection examples with replacement (the bag) and reruns the whole contest on
    them: the best candidate in the bag, and the best static merge in the bag. Both are then judged on the examples
    the bag left out (about 37% of each task): the estimate is the mean of their fitness difference over
    resamples (0 in a resample where a static merge wins the bag). The bag holds about 63% distinct examples, so
    its contests are noisier than the real one and the estimate errs on the low side. None without a searched or
    without a static candidate. Keys: ``gain`` (normalised fitness), ``ci95`` (the 2.5% and 97.5% quantiles of the
    per-resample differences), ``searched_won_share`` (resamples whose bag a searched candidate won),
    ``resamples`` (those with an out-of-bag example in every task)."""
    kinds = [c.kind for c in candidates]
    if "static" not in kinds or "searched" not in kinds:
        return None
    parts = [_selection_parts(candidate, selection_problem) for candidate in candidates]
    in_bag, out_of_bag = _resampled_task_scores(parts, resamples, seed)
    fitness = _fitness_of(selection_problem)
    bag, judged = fitness(in_bag).nan_to_num(nan=-math.inf), fitness(out_of_bag)  # a failed merge never wins
    static = torch.tensor([kind == "static" for kind in kinds])
    top = bag == bag.max(1, keepdim=True).values
    static_top = top & static  # an exact tie goes to a static merge, as in `select_release`
    winner = torch.where(static_top.any(1), static_top.double().argmax(1), top.double().argmax(1))
    best_static = torch.where(static, bag, torch.tensor(-math.inf, dtype=torch.float64)).argmax(1)
    rows = torch.arange(resamples)
    difference = judged[rows, winner] - judged[rows, best_static]
    valid = torch.isfinite(difference)  # not when a task had no example left out, or every merge failed
    if not bool(valid.any()):
        return None
    difference = difference[valid]
    low, high = torch.quantile(difference, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"gain": float(difference.mean()), "ci95": [low, high],
            "searched_won_share": float((~static[winner[valid]]).double().mean()),
            "resamples": int(valid.sum())}


def release_by_rule(rule: str, winner: Candidate, rival: Candidate | None, margin: dict[str, Any] | None) -> Candidate:
    """The merge to release under `rule`, given the selection contest's `winner`, its `rival` of the other kind
    (`release_rival`) and the margin between them (`selection_margin`).

    ``best``: the winner. ``significant``: the winner, except that a searched winner whose margin over the best
    static merge is not distinguishable from resampling noise (95% interval not above 0, or not finite) gives way
    to that static merge: a search must win clearly to be released. A static winner, or a searched one with no
    static rival, is released under either rule."""
    if rule not in RELEASE_RULES:
        raise ValueError(f"release rule {rule!r}: expected one of {RELEASE_RULES}")
    if rule == "significant" and winner.kind == "searched" and rival is not None and not (
            margin is not None and margin["distinguishable"]):
        return rival
    return winner


def named_scores(problem: MergeProblem, task_scores: torch.Tensor) -> dict[str, float | None]:
    """Per task its raw score, ``mean`` (raw weighted mean) and ``normalised`` (the fitness the search uses)."""
    values = {name: float(s) for name, s in zip(problem.task_names, task_scores)}
    values["mean"] = float(task_scores.double() @ problem.task_weights)
    values["normalised"] = float(problem.aggregate(task_scores.unsqueeze(0))[0])
    return {key: _finite(value) for key, value in values.items()}


def score_table(merges: dict[str, StaticMerge], problems: dict[str, MergeProblem],
                progress: tqdm | None = None) -> Scores:
    """``scores[merge][split][task | "mean" | "normalised"]`` of every merge on every split's problem."""
    scores: Scores = {name: {} for name in merges}
    for split, problem in problems.items():
        for name, merge in merges.items():
            if progress is not None:
                progress.set_postfix_str(f"{split}: {name}")
            scores[name][split] = named_scores(problem, merge.score(problem))
            if progress is not None:
                progress.update()
    return scores
