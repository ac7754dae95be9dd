"""MERGEvolve (evox_merge/algorithms/mergevolve.py): seeded perturbations, the centre's ES, leaving the span."""

import torch

from evox_merge.algorithms.mergevolve import MERGEvolve, centred_ranks
from evox_merge.experts.kernel import merged_delta, span_report
from evox_merge.experts.spaces import PerturbationSpace
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.run.loop import search


def start(experts, sigma=0.3, rank=2):
    coefficients = torch.full((experts.num_experts,), 0.5)
    centre = {name: merged_delta(layer, coefficients) for name, layer in experts.layers.items()}
    return PerturbationSpace(list(experts.layers), experts.expert_names, centre, rank=rank, sigma=sigma), centre


def test_a_perturbation_regenerates_from_its_seed_and_sign_zero_is_the_centre(tiny_experts):
    space, centre = start(tiny_experts)
    x = torch.tensor([12345.0, 1.0])
    first, again = space.deltas(x), space.deltas(x)
    assert all(torch.equal(first[name], again[name]) for name in first)
    minus = space.deltas(torch.tensor([12345.0, -1.0]))
    assert all(torch.allclose(first[n] + minus[n], 2 * centre[n], atol=1e-6) for n in first)  # antithetic
    still = space.deltas(torch.tensor([12345.0, 0.0]))
    assert all(torch.equal(still[name], centre[name]) for name in still)
    other = space.deltas(torch.tensor([54321.0, 1.0]))
    assert any(not torch.equal(first[n], other[n]) for n in first)
    # a fresh space (another process, a resumed run) draws the same perturbation
    fresh, _ = start(tiny_experts)
    assert all(torch.equal(fresh.deltas(x)[n], first[n]) for n in first)


def test_the_span_residual_is_zero_at_the_start_and_positive_after_a_perturbation(tiny_experts):
    space, centre = start(tiny_experts)
    n = tiny_experts.num_experts
    assert span_report(tiny_experts.layers, n, centre)["relative"] < 1e-6
    assert span_report(tiny_experts.layers, n, space.deltas(torch.tensor([7.0, 1.0])))["relative"] > 0.05


def test_centred_ranks():
    assert torch.equal(centred_ranks(torch.tensor([3.0, 1.0, 2.0])), torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64))


def test_mergevolve_runs_in_a_workflow_and_is_deterministic(tiny_experts, tiny_setup):
    runs = []
    for _ in range(2):
        space, centre = start(tiny_experts)
        problem = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=8, space=space)
        algorithm = MERGEvolve(space, pairs=2, learning_rate=1.0, seed=5)
        monitor = search(algorithm, problem, 3)
        runs.append((monitor, algorithm.centre_deltas()))
    (monitor, moved), (again, moved_again) = runs
    assert len(monitor.records) == 3 * 5 and [r["coefficients"] for r in monitor.records] == [
        r["coefficients"] for r in again.records]
    assert [r["fitness"] for r in monitor.records] == [r["fitness"] for r in again.records]
    assert all(torch.equal(moved[n], moved_again[n]) for n in moved)
    assert any(not torch.equal(moved[n], centre[n]) for n in moved)  # the centre moved
    assert span_report(tiny_experts.layers, tiny_experts.num_experts, moved)["relative"] > 0
    assert all(r["coefficients"] == [0.0, 0.0] for r in monitor.records[::5])  # each generation scores the centre


def test_a_search_with_a_mergevolve_stage_records_it_and_releases_the_better_merge(tiny_setup, tmp_path):
    import json

    import pytest
    import yaml

    from evox_merge.run.evaluate import evaluate_model
    from evox_merge.run.monitor import read_records
    from evox_merge.run.search import run_search
    from tests.test_search import search_config

    out = tmp_path / "out"
    config = search_config(tiny_setup, out, algorithm={"name": "cmaes", "pop_size": 4, "start": "default"},
                           budget={"generations": 2}, mergevolve={"generations": 2, "pairs": 1, "sigma": 0.5, "rank": 2},
                           release={"baselines": False})
    result = run_search(config, progress="quiet")
    recipe = json.loads((out / "recipe.json").read_text())
    stage = recipe["mergevolve"]
    assert stage["evaluations"] == 2 * 3 and len(read_records(out / "mergevolve_records.jsonl")) == 6
    assert stage["released"] == (stage["final_fitness"] > stage["start_fitness"])
    assert stage["span_residual"]["relative"] > 0 and stage["start"].startswith("record:")
    assert (recipe["release"]["name"] == "mergevolve") == stage["released"]
    margin = stage["selection_margin"]  # the evolved centre against its start, paired on the selection part
    assert stage["judged_on"] == "selection part" and margin["over"] == stage["start"]
    assert margin["margin"] == pytest.approx(stage["final_fitness"] - stage["start_fitness"], abs=1e-6)
    # no static merges: nothing of the other kind in the contest, so the release has a margin only if evolved
    assert recipe["release"]["selection_margin"] == (margin if stage["released"] else None)
    assert recipe["lineage"]["nodes"][-1]["kind"] == "release"
    spec_file = tmp_path / "tasks.yaml"
    spec_file.write_text(yaml.safe_dump([spec.to_dict() for spec in tiny_setup.tasks]))
    scores = evaluate_model(tiny_setup.base_dir, spec_file, adapter=out / "best" / "adapter", split="test")
    for name in (spec.name for spec in tiny_setup.tasks):
        assert scores[name] == pytest.approx(result.scores["release"]["test"][name], abs=1e-4)
