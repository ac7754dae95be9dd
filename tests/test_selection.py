"""Release selection on held-out examples, the search/selection split, and per-task normalisation."""

import math

import pytest
import torch

from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.normalisation import anchor_normalisation, normalisation_from_anchors
from evox_merge.run.selection import (contest_out_of_bag, release_by_rule, release_rival, searched_candidates,
                                      select_release, selection_margin, static_candidates, tied_with)
from evox_merge.tasks import read_task, split_task


def _records(coefficients, fitness):
    return [{"id": i, "coefficients": c, "fitness": f} for i, (c, f) in enumerate(zip(coefficients, fitness))]


def test_selection_ignores_search_part_scores(tiny_setup, tiny_experts):
    selection = MergeProblem(tiny_experts, tiny_setup.tasks)
    vectors = [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.8, 0.0, -0.6], [0.5, 0.5, 0.5, 0.5],
               [-0.9, 0.3, 0.9, 0.0]]
    truth = selection.evaluate(torch.tensor(vectors)).tolist()
    assert len(set(truth)) == len(truth), "the fixture must tell the candidates apart"
    # search-part fitness in the opposite order of the selection part's: the search's favourite is the worst here
    order = sorted(range(len(vectors)), key=lambda i: truth[i])
    search_fitness = [0.0] * len(vectors)
    for rank, index in enumerate(order):
        search_fitness[index] = float(len(vectors) - rank)
    candidates = searched_candidates(_records(vectors, search_fitness), top_k=5)
    assert torch.equal(candidates[0].merge.coefficients, torch.tensor(vectors[order[0]]))  # entered first by search rank
    winner = select_release(candidates, selection)
    assert torch.equal(winner.merge.coefficients, torch.tensor(vectors[max(range(len(truth)), key=truth.__getitem__)]))
    assert winner.selection_fitness == pytest.approx(max(truth), abs=1e-6)
    assert winner.name != candidates[0].name


def test_a_static_merge_can_win_and_without_a_selection_part_the_best_searched_does(tiny_setup, tiny_experts):
    problem = MergeProblem(tiny_experts, tiny_setup.tasks)
    statics = static_candidates(problem, ["best_single", "task_arithmetic"])
    hopeless = searched_candidates(_records([[-1.0, -1.0, -1.0, -1.0]], [10.0]), top_k=3)
    assert select_release(hopeless + statics, problem).kind == "static"
    assert select_release(hopeless + statics, None).name == hopeless[0].name


def test_an_exact_tie_releases_the_static_merge(tiny_setup, tiny_experts):
    """A searched candidate equal to tuned task arithmetic, listed first, ties it exactly: the static merge wins the
    contest, the searched one is named as tied, and no out-of-bag resample gives the tie to the search."""
    problem = MergeProblem(tiny_experts, tiny_setup.tasks)
    statics = static_candidates(problem, ["task_arithmetic"])
    copy = searched_candidates(_records([statics[0].merge.coefficients.tolist()], [1.0]), top_k=1)
    winner = select_release(copy + statics, problem)
    assert copy[0].selection_fitness == statics[0].selection_fitness
    assert winner.kind == "static" and tied_with(winner, copy + statics) == [copy[0].name]
    assert contest_out_of_bag(copy + statics, problem, resamples=50)["searched_won_share"] == 0.0


def test_example_parts_recorded_on_every_scoring_path_give_the_scores(tiny_setup, tiny_experts):
    """A linear merge, a dense (TIES) merge and a searched candidate, scored while recording: each task's
    per-example parts sum to the score it gets without recording."""
    problem = MergeProblem(tiny_experts, tiny_setup.tasks)
    merges = [c.merge for c in static_candidates(problem, ["task_arithmetic", "ties"])]
    merges.append(searched_candidates(_records([[0.3, -0.2, 0.6, 0.1]], [1.0]), top_k=1)[0].merge)
    for merge in merges:
        plain = merge.score(problem)
        with problem.recording_example_parts() as parts:
            recorded = merge.score(problem)
        assert len(parts) == len(tiny_setup.tasks)
        assert [num.numel() for num, _ in parts] == [len(task.records) for task in problem.tasks]
        from_parts = torch.tensor([float(num.sum() / den.sum()) for num, den in parts], dtype=torch.float64)
        torch.testing.assert_close(from_parts, plain, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(recorded, plain, rtol=1e-6, atol=1e-6)
    assert problem._parts is None  # recording ends with the block


def test_selection_margin_is_a_paired_bootstrap_against_the_other_kind(tiny_setup, tiny_experts):
    problem = MergeProblem(tiny_experts, tiny_setup.tasks).normalise(anchor_normalisation(
        MergeProblem(tiny_experts, tiny_setup.tasks)))
    statics = static_candidates(problem, ["best_single", "task_arithmetic"])
    searched = searched_candidates(_records([[-1.0, -1.0, -1.0, -1.0], [0.4, 0.4, 0.4, 0.4]], [2.0, 1.0]), top_k=2)
    candidates = searched + statics
    winner = select_release(candidates, problem)
    rival = release_rival(winner, candidates)
    assert rival.kind != winner.kind
    assert rival.selection_fitness == max(c.selection_fitness for c in candidates if c.kind != winner.kind)
    margin = selection_margin(winner, rival, problem, resamples=500)
    assert margin["over"] == rival.name and margin["resamples"] == 500
    assert margin["margin"] == pytest.approx(winner.selection_fitness - rival.selection_fitness, abs=1e-6)
    low, high = margin["ci95"]
    assert low <= margin["margin"] <= high and margin["distinguishable"] == (low > 0)
    assert margin["examples"] == {t.spec.name: len(t.records) for t in problem.tasks}
    # a merge against itself: every resample gives 0, nothing to tell apart
    same = selection_margin(statics[1], statics[1], problem, resamples=200)
    assert same["margin"] == 0 and same["ci95"] == [0.0, 0.0] and not same["distinguishable"]
    assert same["rival_as_good_share"] == 1.0
    # the worst searched candidate against task arithmetic: a clear loss, the whole interval below 0
    hopeless = selection_margin(searched[0], statics[1], problem, resamples=500)
    assert hopeless["ci95"][1] < 0 and hopeless["rival_as_good_share"] == 1.0
    assert selection_margin(winner, None, problem) is None


def test_rule_significant_releases_a_searched_winner_only_when_it_wins_clearly(tiny_setup, tiny_experts):
    problem = MergeProblem(tiny_experts, tiny_setup.tasks).normalise(anchor_normalisation(
        MergeProblem(tiny_experts, tiny_setup.tasks)))
    statics = static_candidates(problem, ["best_single", "task_arithmetic"])
    best_static = select_release(statics, problem)
    # a searched candidate with the best static merge's coefficients ties with it: the contest releases the static
    # merge; the rule is checked on the searched twin as if it had won (a margin of exactly 0)
    twin = searched_candidates(_records([best_static.merge.coefficients.tolist()], [1.0]), top_k=1)
    candidates = twin + statics
    assert select_release(candidates, problem) is best_static
    winner = twin[0]
    rival = release_rival(winner, candidates)
    assert rival is best_static
    margin = selection_margin(winner, rival, problem, resamples=200)
    assert margin["margin"] == pytest.approx(0, abs=1e-6) and not margin["distinguishable"]
    assert release_by_rule("best", winner, rival, margin) is winner
    assert release_by_rule("significant", winner, rival, margin) is rival  # not a clear win: the static merge
    assert release_by_rule("significant", winner, rival, {**margin, "distinguishable": True}) is winner
    assert release_by_rule("significant", winner, None, None) is winner  # no static merge competed
    assert release_by_rule("significant", best_static, winner, margin) is best_static  # statics need no margin
    with pytest.raises(ValueError, match="release rule 'clear'"):
        release_by_rule("clear", winner, rival, margin)


def test_out_of_bag_reruns_the_contest_on_each_resample_and_judges_it_on_what_the_resample_left_out(
        tiny_setup, tiny_experts):
    problem = MergeProblem(tiny_experts, tiny_setup.tasks).normalise(anchor_normalisation(
        MergeProblem(tiny_experts, tiny_setup.tasks)))
    statics = static_candidates(problem, ["best_single", "task_arithmetic"])
    searched = searched_candidates(_records([[0.4, 0.4, 0.4, 0.4], [0.1, 0.2, 0.0, 0.3]], [2.0, 1.0]), top_k=2)
    candidates = searched + statics
    select_release(candidates, problem)  # records every contestant's per-example parts
    assert all(c.selection_parts is not None for c in candidates)
    estimate = contest_out_of_bag(candidates, problem, resamples=20, seed=3)
    # the same 20 resamples, one at a time: the contest rerun in the bag, both picks judged on the rest
    generator = torch.Generator().manual_seed(3)
    draws = [torch.randint(len(task.records), (20, len(task.records)), generator=generator) for task in problem.tasks]
    differences, searched_won = [], 0
    for b in range(20):
        bag, rest = [], []
        for k, task in enumerate(problem.tasks):
            inside = draws[k][b]
            outside = torch.tensor(sorted(set(range(len(task.records))) - set(inside.tolist())))
            parts = [(num.double(), den.double()) for num, den in (c.selection_parts[k] for c in candidates)]
            bag.append([float(num[inside].sum() / den[inside].sum()) for num, den in parts])
            rest.append([float(num[outside].sum() / den[outside].sum()) for num, den in parts])
        weights = problem.task_weights.double()
        in_bag = problem.normalisation.apply(torch.tensor(bag, dtype=torch.float64).T) @ weights
        left_out = problem.normalisation.apply(torch.tensor(rest, dtype=torch.float64).T) @ weights
        winner = int(in_bag.argmax())
        best_static = max(range(2, 4), key=lambda i: (in_bag[i], -i))
        differences.append(float(left_out[winner] - left_out[best_static]))
        searched_won += candidates[winner].kind == "searched"
    assert estimate["resamples"] == 20
    assert estimate["gain"] == pytest.approx(sum(differences) / 20, abs=1e-9)
    assert estimate["searched_won_share"] == searched_won / 20
    # a searched twin of the best static merge gains nothing in any resample
    best_static = select_release(statics, problem)
    twin = searched_candidates(_records([best_static.merge.coefficients.tolist()], [1.0]), top_k=1)
    same = contest_out_of_bag(twin + statics, problem, resamples=200)
    assert same["gain"] == 0 and same["ci95"] == [0.0, 0.0]
    assert contest_out_of_bag(statics, problem) is None and contest_out_of_bag(searched, problem) is None


def test_searched_candidates_are_distinct_top_k_and_skip_failures():
    records = _records([[0.1, 0.2], [0.1, 0.2], [0.3, 0.0], [0.5, 0.5], [0.9, 0.9]], [0.9, 0.95, 0.5, None, 0.7])
    names = [c.name for c in searched_candidates(records, top_k=2)]
    assert names == ["record:1", "record:4"]


def test_split_is_deterministic_disjoint_and_sized(tiny_setup):
    task = read_task(tiny_setup.tasks[0])
    search, selection = split_task(task, 0.3)
    again_search, again_selection = split_task(task, 0.3)
    assert search.records == again_search.records and selection.records == again_selection.records
    n = len(task.records)
    assert len(selection.records) == round(0.3 * n) and len(search.records) + len(selection.records) == n
    key = lambda r: repr(sorted(r.items()))  # noqa: E731
    assert not {key(r) for r in search.records} & {key(r) for r in selection.records}
    limited, same_selection = split_task(task, 0.3, search_limit=3)
    assert limited.records == search.records[:3] and same_selection.records == selection.records
    whole, none = split_task(task, 0.0, search_limit=4)
    assert none is None and whole.records == task.records[:4]


def test_normalisation_maps_base_to_zero_and_best_single_to_one(tiny_setup, tiny_experts):
    problem = MergeProblem(tiny_experts, tiny_setup.tasks)
    normalisation = anchor_normalisation(problem)
    anchors = torch.cat([torch.zeros(1, 4), torch.eye(4)])
    normalised = normalisation.apply(problem.evaluate_per_task(anchors))
    torch.testing.assert_close(normalised[0], torch.zeros(3, dtype=torch.float64))
    best = normalised[1:].max(dim=0).values  # the best single expert: +1, or -1 where every expert is below base
    torch.testing.assert_close(best.abs()[normalisation.scale != 1], torch.ones_like(best)[normalisation.scale != 1])
    raw = problem.evaluate_per_task(anchors)
    assert torch.equal(normalised.argsort(dim=0), raw.double().argsort(dim=0)), "normalising must keep the order"
    problem.normalise(normalisation)
    torch.testing.assert_close(problem.aggregate(raw), normalisation.apply(raw) @ problem.task_weights)


def test_normalisation_of_known_scores_flat_and_nan_tasks():
    scores = torch.tensor([[0.5, -6.0, 0.3, 0.2, 0.8],     # base
                           [0.7, -5.0, 0.3, math.nan, 0.4],  # expert a
                           [0.6, -4.0, 0.3, 0.4, 0.6]])    # expert b
    n = normalisation_from_anchors(["acc", "lm", "flat", "nan", "worse"], ["a", "b"], scores)
    assert n.best_single == ("a", "b", "a", "b", "b")
    torch.testing.assert_close(n.offset, torch.tensor([0.5, -6.0, 0.3, 0.2, 0.8], dtype=torch.float64))
    torch.testing.assert_close(n.scale, torch.tensor([0.2, 2.0, 1.0, 0.2, 0.2], dtype=torch.float64))
    torch.testing.assert_close(n.apply(torch.tensor([[0.6, -5.0, 0.4, 0.3, 0.6]])),
                               torch.tensor([[0.5, 0.5, 0.1, 0.5, -1.0]], dtype=torch.float64))
