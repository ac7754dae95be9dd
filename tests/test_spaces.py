"""Search spaces (evox_merge/experts/spaces.py): layer-wise coefficients, their grouping, and the same merges."""

import pytest
import torch

from evox_merge.experts.kernel import merged_delta
from evox_merge.experts.merger import shared_merger
from evox_merge.experts.spaces import ExpertSpace, LayerSpace, build_space
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.util.errors import MergeInputError


def layer_space(experts, **options):
    return build_space(list(experts.layers), experts.expert_names, "layer", **options)


def test_grouping_and_names(tiny_experts):
    blocks = layer_space(tiny_experts, by="blocks", groups=2)
    n = tiny_experts.num_experts
    assert blocks.dim == 2 * n and blocks.group_names == ("block 0", "block 1")
    assert blocks.names[n] == f"block 1/{tiny_experts.expert_names[0]}"
    assert all((".0." in name) == (g == 0) for name, g in zip(blocks.layer_names, blocks.group_of_layer))
    whole = layer_space(tiny_experts, by="blocks", groups=1)
    assert whole.dim == n and whole.group_names == ("blocks 0-1",)
    modules = layer_space(tiny_experts, by="module")
    assert set(modules.group_names) <= {"attention", "mlp"} and modules.dim == len(modules.group_names) * n
    assert modules.to_dict()["layers"][blocks.layer_names[0]] in modules.group_names
    with pytest.raises(MergeInputError, match="groups must be an integer from 1 to 2"):
        layer_space(tiny_experts, by="blocks", groups=3)
    with pytest.raises(MergeInputError, match="'blocks' or 'module'"):
        layer_space(tiny_experts, by="heads")
    with pytest.raises(MergeInputError, match="'expert' or 'layer'"):
        build_space(list(tiny_experts.layers), tiny_experts.expert_names, "operator")


def test_equal_coefficients_per_group_are_the_expert_space_merge(tiny_experts, tiny_setup):
    expert = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=8)
    space = layer_space(tiny_experts, by="blocks", groups=2)
    layered = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=8, space=space)
    pop = torch.randn(3, tiny_experts.num_experts, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layered.evaluate_per_task(layered.in_space(pop)), expert.evaluate_per_task(pop))
    with pytest.raises(MergeInputError, match=r"shape \(P, %d\) \(the layer space's dimensions\)" % space.dim):
        layered.evaluate_per_task(pop)


def test_a_layer_candidate_merges_each_group_with_its_own_coefficients(tiny_experts):
    space = layer_space(tiny_experts, by="blocks", groups=2)
    n = tiny_experts.num_experts
    first, second = torch.randn(n, generator=torch.Generator().manual_seed(1)), torch.zeros(n)
    merger = shared_merger(tiny_experts)
    with merger.merged(space.layer_coefficients(torch.cat([first, second]))):
        for name, g in zip(space.layer_names, space.group_of_layer):
            weight = tiny_experts.target_module(name).weight
            expected = merger._originals[name] + merged_delta(tiny_experts.layers[name], first if g == 0 else second)
            assert torch.allclose(weight, expected, atol=1e-6), name
    with pytest.raises(ValueError, match="one per target layer"):
        merger.apply(torch.zeros(len(space.layer_names) + 1, n))


def test_several_candidates_per_pass_in_a_layer_space(tiny_experts, tiny_setup):
    space = layer_space(tiny_experts, by="module")
    pop = torch.randn(4, space.dim, generator=torch.Generator().manual_seed(2)) * 0.5
    one = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=8, space=space).evaluate_per_task(pop)
    rows = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=8, space=space,
                        candidates_per_pass=2).evaluate_per_task(pop)
    assert torch.allclose(one, rows, atol=1e-4)


def test_expert_space_is_the_default(tiny_experts, tiny_setup):
    problem = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=8)
    assert isinstance(problem.space, ExpertSpace) and problem.dim == tiny_experts.num_experts
    assert problem.space.names == tiny_experts.expert_names and not isinstance(problem.space, LayerSpace)
