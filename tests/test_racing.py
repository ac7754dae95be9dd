"""Racing (evox_merge/problems/racing.py): survivors score exactly, drops are counted, settings are checked."""

import math

import pytest
import torch

from evox_merge.algorithms.common import kth_best
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.racing import Racing, RacingState, t_over_z, task_estimates
from evox_merge.run.config import load_config
from evox_merge.run.monitor import read_records
from evox_merge.run.search import run_search
from evox_merge.util.errors import MergeInputError
from tests.test_search import search_config


def population(experts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pop = torch.rand(12, experts.num_experts, generator=generator) * 2 - 1
    pop[8:] *= 6  # far outside the experts' range: clearly worse candidates for racing to drop
    return pop


def test_survivors_score_exactly_and_the_used_candidates_are_the_same(tiny_experts, tiny_setup):
    problem = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=8)
    pop = population(tiny_experts)
    plain = problem.evaluate_per_task(pop)
    assert problem.examples_scored == [problem.examples_total] * 12
    problem.race(Racing(top_k=2, confidence=0.9), lambda lower: kth_best(lower, 3))
    raced = problem.evaluate_per_task(pop)
    scored = torch.tensor(problem.examples_scored)
    full = scored == problem.examples_total
    assert (~full).any(), "nothing was dropped: the test no longer exercises racing"
    assert torch.equal(raced[full], plain[full]) or torch.allclose(raced[full], plain[full], rtol=0, atol=1e-12)
    assert (scored[~full] < problem.examples_total).all() and (scored > 0).all()
    # The algorithm's best 3 and the release's best 2 are what the plain path ranks best.
    plain_order = problem.aggregate(plain).argsort(descending=True)
    raced_order = problem.aggregate(raced).argsort(descending=True)
    assert set(plain_order[:3].tolist()) == set(raced_order[:3].tolist())
    assert full[plain_order[:3]].all()
    again = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=8)
    again.race(Racing(top_k=2, confidence=0.9), lambda lower: kth_best(lower, 3))
    assert torch.equal(again.evaluate_per_task(pop), raced) and again.examples_scored == problem.examples_scored


def test_an_algorithm_that_uses_every_candidate_loses_none(tiny_experts, tiny_setup):
    problem = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=8)
    pop = population(tiny_experts, seed=1)
    plain = problem.evaluate_per_task(pop)
    problem.race(Racing(top_k=1, confidence=0.6), None)
    assert torch.allclose(problem.evaluate_per_task(pop), plain, rtol=0, atol=1e-12)
    assert problem.examples_scored == [problem.examples_total] * 12


def test_estimates_and_errors():
    # Accuracy 3 of 4 scored of 8: smoothed Bernoulli variance floor, finite-population correction.
    estimate, error = task_estimates([torch.tensor([1.0, 1, 1, 0])], [torch.ones(4)], [8], [True])
    assert estimate.item() == 0.75
    assert error.item() == pytest.approx(math.sqrt(0.25 * 4 / 4 / 4 * (1 - 4 / 8)), rel=1e-9)
    widened = task_estimates([torch.tensor([1.0, 1, 1, 0])], [torch.ones(4)], [8], [True], z=1.645)[1]
    assert widened.item() == pytest.approx(error.item() * t_over_z(1.645, 3), rel=1e-9)
    assert t_over_z(1.645, 3) == pytest.approx(2.353 / 1.645, rel=0.02)  # Student's t, 3 dof, 95% one-sided
    assert t_over_z(1.645, 1) == math.inf
    agreed = task_estimates([torch.ones(4)], [torch.ones(4)], [8], [True])[1]
    assert agreed.item() > 0  # every example agreeing is not certainty
    done = task_estimates([torch.ones(8)], [torch.ones(8)], [8], [True])[1]
    assert done.item() == 0  # all examples scored: exact
    # Language modelling: the estimate is sum(log-probs) / sum(tokens), as the plain score.
    estimate, _ = task_estimates([torch.tensor([-4.0, -9.0])], [torch.tensor([2.0, 3.0])], [5], [False])
    assert estimate.item() == pytest.approx(-13 / 5)


def test_racing_state_restores_from_records():
    state = RacingState(top_k=2)
    state.restore([{"fitness": 0.5, "examples_scored": 10, "examples_total": 10},
                   {"fitness": 0.9, "examples_scored": 4, "examples_total": 10},  # an estimate: not exact
                   {"fitness": 0.7}, {"fitness": None}, {"fitness": 0.2}])
    assert state.best == [0.7, 0.5]


def test_settings_are_checked(tiny_setup, tmp_path):
    with pytest.raises(MergeInputError, match="stages"):
        Racing(stages=(0.5, 0.4, 1.0))
    base = search_config(tiny_setup, tmp_path / "out")
    with pytest.raises(MergeInputError, match="racing.stages"):
        load_config({**base, "racing": {"stages": [0.5, 0.9]}})
    with pytest.raises(MergeInputError, match="PSO"):
        load_config({**base, "algorithm": {"name": "pso", "pop_size": 4}, "racing": {}})
    with pytest.raises(MergeInputError, match="distributed"):
        load_config({**base, "racing": {}, "distributed": True})


@pytest.mark.slow
def test_a_raced_search_records_how_many_examples_each_candidate_saw(tiny_setup, tmp_path):
    config = search_config(tiny_setup, tmp_path / "out", algorithm={"name": "cmaes", "pop_size": 8},
                           budget={"generations": 3}, racing={"confidence": 0.8}, release={"baselines": False})
    result = run_search(config, progress="quiet")
    records = read_records(tmp_path / "out" / "records.jsonl")
    assert len(records) == 24 and all(0 < r["examples_scored"] <= r["examples_total"] for r in records)
    assert any(r["examples_scored"] < r["examples_total"] for r in records)
    best = max(records, key=lambda r: r["fitness"])
    assert best["examples_scored"] == best["examples_total"] and result.best_fitness == best["fitness"]
