import pytest
import torch
from peft.utils import merge_utils

from evox_merge import baselines
from evox_merge.problems.merge_problem import MergeProblem


@pytest.fixture(scope="module")
def problem(tiny_setup, tiny_experts):
    return MergeProblem(tiny_experts, tiny_setup.tasks[:2])


def test_linear_baselines_pick_the_best_candidate(problem):
    single = baselines.best_single_expert(problem)
    all_singles = problem.aggregate(problem.evaluate_per_task(torch.eye(4)))
    assert single.fitness == pytest.approx(float(all_singles.max()))
    assert single.settings["expert"] == problem.experts.expert_names[int(all_singles.argmax())]
    arithmetic = baselines.task_arithmetic(problem, scalings=(0.1, 0.5))
    assert arithmetic.coefficients.tolist() == pytest.approx([arithmetic.settings["scaling"]] * 4)
    assert baselines.base_model(problem).coefficients.abs().sum() == 0
    assert baselines.model_soup(problem).coefficients.tolist() == [0.25] * 4


def test_ties_equals_peft_merge_utils_and_scores_through_the_problem(problem):
    merge = baselines.dense_merge(problem, "ties", density=0.3, scalings=(0.4,))
    layer = "model.layers.0.self_attn.q_proj"
    task_vectors = list(problem.experts.layers[layer].dense_task_vectors(4))
    expected = merge_utils.ties(task_vectors, torch.full((4,), 0.4), 0.3)
    torch.testing.assert_close(merge.deltas[layer], expected)
    torch.testing.assert_close(merge.score(problem), merge.validation_scores)


def test_dare_is_seeded_and_leaves_global_rng_alone(problem):
    state = torch.random.get_rng_state()
    first = baselines.dense_merge(problem, "dare_linear", density=0.5, scalings=(0.5,), seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = baselines.dense_merge(problem, "dare_linear", density=0.5, scalings=(0.5,), seed=1)
    other = baselines.dense_merge(problem, "dare_linear", density=0.5, scalings=(0.5,), seed=2)
    layer = next(iter(first.deltas))
    assert torch.equal(first.deltas[layer], again.deltas[layer])
    assert not torch.equal(first.deltas[layer], other.deltas[layer])


def test_static_baselines_cover_every_method(problem):
    names = [merge.name for merge in baselines.static_baselines(problem, scalings=(0.5,))]
    assert names == ["base", "best_single", "model_soup", "task_arithmetic", "ties", "dare_ties"]
