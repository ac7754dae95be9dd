"""Static merges (evox_merge/problems/static_merges.py): linear baselines, TIES and DARE via peft.utils.merge_utils."""

import pytest
import torch
from peft.utils import merge_utils

from evox_merge.experts.kernel import dense_task_vectors
from evox_merge.problems import static_merges as baselines
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
    task_vectors = list(dense_task_vectors(problem.experts.layers[layer], 4))
    expected = merge_utils.ties(task_vectors, torch.full((4,), 0.4), 0.3)
    torch.testing.assert_close(merge.deltas[layer], expected)
    torch.testing.assert_close(merge.score(problem), merge.validation_scores)


@pytest.mark.parametrize("density", [0.01, 0.3, 0.77, 1.0])
def test_batched_magnitude_pruning_is_peft_s_per_expert(density):
    """Our threshold pruning (kthvalue, or a lookup in the sorted table an operator space keeps) keeps exactly the
    entries peft's topk pruning keeps (no ties in random floats)."""
    from evox_merge.experts.kernel import magnitude_prune, sorted_magnitudes

    task_vectors = torch.randn(3, 37, 53, generator=torch.Generator().manual_seed(int(density * 100)))
    task_vectors[1] = 0.0  # an expert that does not change this layer
    expected = torch.stack([merge_utils.magnitude_based_pruning(t, density) for t in task_vectors])
    assert torch.equal(magnitude_prune(task_vectors, density), expected)
    assert torch.equal(magnitude_prune(task_vectors, density, sorted_magnitudes(task_vectors)), expected)
    assert torch.equal(magnitude_prune(task_vectors, 0.0004), torch.zeros_like(task_vectors))  # k = 0 keeps none


def test_dare_is_seeded_and_leaves_global_rng_alone(problem):
    state = torch.random.get_rng_state()
    first = baselines.dense_merge(problem, "dare_linear", density=0.5, scalings=(0.5,), seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = baselines.dense_merge(problem, "dare_linear", density=0.5, scalings=(0.5,), seed=1)
    other = baselines.dense_merge(problem, "dare_linear", density=0.5, scalings=(0.5,), seed=2)
    layer = next(iter(first.deltas))
    assert torch.equal(first.deltas[layer], again.deltas[layer])
    assert not torch.equal(first.deltas[layer], other.deltas[layer])


def test_every_static_merge_is_tuned_on_the_problem_and_rescores_to_its_fitness(problem):
    for name in baselines.STATIC_MERGES:
        merge = baselines.tune_static_merge(name, problem, seed=1)
        assert merge.name in (name, "dare_ties")
        rescored = float(problem.aggregate(merge.score(problem).unsqueeze(0))[0])
        assert rescored == pytest.approx(merge.fitness, abs=1e-6)
    with pytest.raises(ValueError, match="unknown static merge"):
        baselines.tune_static_merge("soup", problem)


@pytest.mark.parametrize("density", [0.0001, 0.3, 1.0])
def test_ties_by_blocks_of_rows_equals_the_whole_layer_merge(density, monkeypatch):
    """The operator space's TIES (`ties_layer_delta`: a LoRA layer's task vectors built, pruned and merged block by
    block of rows, thresholds from the sorted table) equals pruning and merging the whole layer at once, entry for
    entry, with uneven ranks, an expert that does not target the layer and blocks that do not divide the rows."""
    from evox_merge.experts import kernel

    generator = torch.Generator().manual_seed(7)
    ranks = [4, 0, 8, 2]
    layer = kernel.LayerFactors(torch.randn(sum(ranks), 29, generator=generator),
                                torch.randn(41, sum(ranks), generator=generator),
                                torch.cat([torch.full((r,), i) for i, r in enumerate(ranks)]))
    weights = torch.tensor([0.3, 0.9, -0.5, 1.2])
    task_vectors = kernel.dense_task_vectors(layer, 4)
    whole = kernel._ties_merge(kernel.magnitude_prune(task_vectors, density), weights)
    monkeypatch.setattr(kernel, "TIES_BLOCK_ENTRIES", 29 * 6)  # 6 rows a block: 7 blocks, the last of 5 rows
    blocks = kernel.operator_delta(layer, 4, "ties", weights, density, kernel.sorted_magnitudes(task_vectors))
    assert torch.equal(blocks, whole)
    assert torch.equal(kernel.operator_delta(layer, 4, "ties", weights, density), whole)  # no table: whole layer
    if density < 1:
        torch.testing.assert_close(whole, merge_utils.ties(list(task_vectors), weights, density))
