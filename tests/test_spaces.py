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
    with pytest.raises(MergeInputError, match="'expert', 'layer' or 'operator'"):
        build_space(list(tiny_experts.layers), tiny_experts.expert_names, "heads")


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


@pytest.mark.slow
def test_a_layer_space_search_releases_and_reapplies_its_layer_wise_merge(tiny_setup, tmp_path):
    import json

    import yaml
    from safetensors.torch import load_file

    from evox_merge.cli import main
    from evox_merge.run.evaluate import evaluate_model
    from evox_merge.run.monitor import read_records
    from evox_merge.run.search import run_search
    from tests.test_search import search_config

    out = tmp_path / "out"
    config = search_config(tiny_setup, out, algorithm={"name": "cmaes", "pop_size": 6, "start": "default"},
                           budget={"generations": 2}, space={"kind": "layer", "by": "blocks", "groups": 2}, release={"baselines": False})
    result = run_search(config, progress="quiet")
    recipe = json.loads((out / "recipe.json").read_text())
    n = len(tiny_setup.adapter_dirs)
    coefficients = recipe["release"]["coefficients"]
    assert recipe["space"]["kind"] == "layer" and recipe["space"]["groups"] == ["block 0", "block 1"]
    assert len(coefficients) == 2 * n and coefficients[:n] != coefficients[n:]
    assert list(recipe["release"]["coefficients_by_name"])[n].startswith("block 1/")
    assert all(len(r["coefficients"]) == 2 * n for r in read_records(out / "records.jsonl"))
    spec_file = tmp_path / "tasks.yaml"
    spec_file.write_text(yaml.safe_dump([spec.to_dict() for spec in tiny_setup.tasks]))
    scores = evaluate_model(tiny_setup.base_dir, spec_file, adapter=out / "best" / "adapter", split="test")
    for name in (spec.name for spec in tiny_setup.tasks):
        assert scores[name] == pytest.approx(result.scores["release"]["test"][name], abs=1e-5)
    assert main(["apply", "--run", str(out), "--out", str(tmp_path / "applied")]) in (0, None)
    released = load_file(out / "best" / "adapter" / "adapter_model.safetensors")
    applied = load_file(tmp_path / "applied" / "adapter" / "adapter_model.safetensors")
    assert released.keys() == applied.keys() and all(torch.equal(released[k], applied[k]) for k in released)
    assert (out / "coefficients.png").stat().st_size > 0


def test_the_operator_space_is_the_static_operator_with_searched_weights(tiny_experts, tiny_setup):
    from evox_merge.problems.static_merges import dense_merge

    space = build_space(list(tiny_experts.layers), tiny_experts.expert_names, "operator", method="ties")
    n = tiny_experts.num_experts
    assert space.dim == n + 1 and space.names[0] == "density" and space.names[1].startswith("scale/")
    problem = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=8, space=space)
    static = dense_merge(MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=8), "ties", density=0.2,
                         scalings=[0.5])
    # density 0.2 <-> x[0] = -0.6; every weight 0.5: the static TIES merge exactly.
    candidate = torch.cat([torch.tensor([-0.6]), torch.full((n,), 0.5)])
    assert torch.equal(problem.evaluate_per_task(candidate.unsqueeze(0))[0], static.validation_scores)
    deltas = space.deltas(candidate, tiny_experts.layers)
    static_deltas = static.delta_dict()
    assert all(torch.equal(deltas[name], static_deltas[name]) for name in static_deltas)
    dare = build_space(list(tiny_experts.layers), tiny_experts.expert_names, "operator", method="dare_ties", seed=3)
    x = torch.cat([torch.tensor([0.0]), torch.full((n,), 0.7)])
    first, again = dare.deltas(x, tiny_experts.layers), dare.deltas(x, tiny_experts.layers)
    assert all(torch.equal(first[name], again[name]) for name in first)  # the masks come from the seed
    with pytest.raises(MergeInputError, match="candidates_per_pass"):
        MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=8, space=space, candidates_per_pass=2)
    with pytest.raises(MergeInputError, match="space.method"):
        build_space(list(tiny_experts.layers), tiny_experts.expert_names, "operator", method="magic")


def test_static_merges_and_anchors_are_the_expert_space_merges_in_an_operator_space(tiny_experts, tiny_setup):
    """TIES elects signs over every expert even at density 1, so an operator-space vector cannot write "expert i
    alone" or task arithmetic; the normalisation's anchors and the linear static merges are scored as the expert
    space's merges (before, one-hot anchors in the TIES space were a sign-elected average, not the expert)."""
    from evox_merge.problems.normalisation import anchor_normalisation
    from evox_merge.problems.static_merges import task_arithmetic

    tasks = tiny_setup.tasks  # the language-modelling task's scores are continuous
    space = build_space(list(tiny_experts.layers), tiny_experts.expert_names, "operator", method="ties")
    operator, expert = (MergeProblem(tiny_experts, tasks, batch_size=8, space=s) for s in (space, None))
    n = tiny_experts.num_experts
    anchors = torch.cat([torch.zeros(1, n), torch.eye(n)])
    assert torch.equal(operator.evaluate_linear(anchors), expert.evaluate_per_task(anchors))
    assert operator.space is space and operator.dim == n + 1  # the problem's own space is back
    ours, theirs = anchor_normalisation(operator), anchor_normalisation(expert)
    assert torch.equal(ours.offset, theirs.offset) and torch.equal(ours.scale, theirs.scale)
    one_hot = operator.evaluate_per_task(operator.in_space(torch.eye(n)[:1]))[0]  # the TIES space's own "expert 0"
    assert not torch.equal(one_hot, expert.evaluate_per_task(torch.eye(n)[:1])[0])
    merged = task_arithmetic(operator, scalings=[0.5])
    assert torch.equal(merged.validation_scores, task_arithmetic(expert, scalings=[0.5]).validation_scores)
    assert torch.equal(merged.score(operator), merged.validation_scores)


@pytest.mark.slow
def test_an_operator_space_search_releases_its_merge(tiny_setup, tmp_path):
    import json

    import yaml

    from evox_merge.run.evaluate import evaluate_model
    from evox_merge.run.search import run_search
    from tests.test_search import search_config

    out = tmp_path / "out"
    config = search_config(tiny_setup, out, algorithm={"name": "cmaes", "pop_size": 6}, budget={"generations": 2},
                           space={"kind": "operator", "method": "dare_ties"}, release={"baselines": False})
    result = run_search(config, progress="quiet")
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["space"]["kind"] == "operator" and "dare_ties" in recipe["operator"]
    assert list(recipe["release"]["coefficients_by_name"])[0] == "density"
    assert 0 < recipe["release"]["span_residual"]["relative"] <= 1  # TIES/DARE leave the experts' span
    spec_file = tmp_path / "tasks.yaml"
    spec_file.write_text(yaml.safe_dump([spec.to_dict() for spec in tiny_setup.tasks]))
    scores = evaluate_model(tiny_setup.base_dir, spec_file, adapter=out / "best" / "adapter", split="test")
    for name in (spec.name for spec in tiny_setup.tasks):  # the adapter is the exact dense delta (full rank)
        assert scores[name] == pytest.approx(result.scores["release"]["test"][name], abs=1e-4)


def test_the_span_residual_is_zero_for_linear_merges_and_positive_off_the_span(tiny_experts):
    from evox_merge.experts.kernel import span_residual

    n = tiny_experts.num_experts
    coefficients = torch.randn(n, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(4)
    for name, layer in tiny_experts.layers.items():
        linear = merged_delta(layer, coefficients)
        assert span_residual(layer, n, linear)[1] < 1e-6, name
        off = linear + 0.1 * linear.norm() * torch.randn(linear.shape, generator=generator) / linear.numel() ** 0.5
        assert span_residual(layer, n, off)[1] > 0.05, name


@pytest.mark.parametrize("kind, options", [("layer", {"by": "blocks", "groups": 2}), ("operator", {"method": "ties"})])
def test_searches_start_from_the_same_merges_in_every_space(tiny_experts, kind, options):
    """EvoGM's round-0 rows, PSO's hybrid swarm and CMA-ES's mean are the expert space's average, task-arithmetic
    and one-hot merges written in the space's coordinates, not one-hots of the space's own dimensions."""
    from evox.core import Problem
    from evox.workflows import StdWorkflow

    from evox_merge.algorithms.common import hybrid_population
    from evox_merge.run.registry import build_algorithm

    class Sphere(Problem):
        def evaluate(self, pop):
            return -(pop ** 2).sum(-1)

    n = tiny_experts.num_experts
    space = build_space(list(tiny_experts.layers), tiny_experts.expert_names, kind, **options)
    structured = torch.cat([torch.full((1, n), 1 / n), torch.full((1, n), 0.5), torch.eye(n)])
    pop = 2 * n + 4
    evogm = build_algorithm("evogm", space.dim, pop_size=pop, seed=3, space=space,
                            params={"task_arithmetic_scales": [0.5], "train_steps": 2})
    StdWorkflow(evogm, Sphere(), opt_direction="max").init_step()
    first = evogm.history.original_coefficients
    assert first.shape == (pop, space.dim)
    assert torch.allclose(first[: n + 2], torch.clamp(space.from_expert(structured), -1, 1))
    if kind == "layer":  # every group gets the expert-space row: the same merge, layer by layer
        expert_space = ExpertSpace(space.layer_names, space.expert_names)
        assert torch.equal(space.layer_coefficients(first[1]), expert_space.layer_coefficients(structured[1]))
    cmaes = build_algorithm("cmaes", space.dim, pop_size=pop, seed=3, space=space)
    assert torch.allclose(cmaes.mean.cpu(), torch.clamp(space.from_expert(structured[0]), -1, 1))
    pso = build_algorithm("pso", space.dim, pop_size=pop, seed=3, space=space)
    assert torch.allclose(pso.pop.cpu()[: n + 1], torch.clamp(space.from_expert(structured[[0, *range(2, n + 2)]]),
                                                              -1, 1))
    # The expert space's rows are unchanged: average, one-hots, then random draws.
    plain = hybrid_population(n, pop, -torch.ones(n), torch.ones(n), torch.Generator().manual_seed(0))
    assert torch.equal(plain[: n + 1], torch.cat([structured[:1], torch.eye(n)]))
