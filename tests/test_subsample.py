"""Subsample mode (evox_merge.problems.subsample): seeded per-generation subsets, paired estimates, what the
algorithms hold, the release on the full search part, and a resume that continues bit-identically."""

import json

import pytest
import torch

from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.normalisation import anchor_normalisation
from evox_merge.problems.subsample import Subsampler, SubsampleSettings, subset_indices
from evox_merge.run.config import load_config
from evox_merge.run.loop import run_generations
from evox_merge.run.monitor import RunMonitor, read_records
from evox_merge.run.registry import build_algorithm
from evox_merge.run.search import SearchInterrupted, run_search
from evox_merge.run.workflow import build_workflow
from evox_merge.tasks import read_task, split_task
from evox_merge.util.errors import MergeInputError
from test_search import FAST_EVOGM, search_config


def test_subsets_depend_only_on_seed_and_generation_and_use_up_the_part_before_repeating():
    total, count = 70, 16  # 4 disjoint blocks per epoch, 6 examples left out of each epoch
    later_first = [subset_indices(5, g, 2, total, count) for g in (9, 3, 0)]
    in_order = [subset_indices(5, g, 2, total, count) for g in range(10)]
    assert all(torch.equal(a, in_order[g]) for a, g in zip(later_first, (9, 3, 0)))  # no hidden state
    assert all(len(s) == count and len(set(s.tolist())) == count and int(s.max()) < total for s in in_order)
    epoch = torch.cat(in_order[:4])
    assert len(set(epoch.tolist())) == 4 * count  # one epoch: disjoint subsets
    assert not torch.equal(torch.cat(in_order[4:8]).sort().values, epoch.sort().values)  # a new permutation
    assert not torch.equal(subset_indices(6, 0, 2, total, count), in_order[0])  # another seed
    assert not torch.equal(subset_indices(5, 0, 3, total, count), in_order[0])  # another task
    assert torch.equal(subset_indices(5, 7, 0, 8, 8), torch.arange(8))  # the whole part


def test_settings_count_examples_and_refuse_bad_values():
    assert SubsampleSettings(16).counts([70, 10]) == [16, 10]
    assert SubsampleSettings(0.25).counts([70, 10, 1]) == [18, 3, 1]
    for size in (0, 1.0, True, "8"):
        with pytest.raises(MergeInputError, match="subsample.size"):
            SubsampleSettings(size)
    with pytest.raises(MergeInputError, match="subsample.elites"):
        SubsampleSettings(4, elites=0)


@pytest.mark.parametrize("overrides, message", [
    ({"algorithm": {"name": "nsga2"}, "objectives": "pareto"}, "subsample: algorithm 'nsga2'"),
    ({"algorithm": {"name": "evox.algorithms.DE"}}, "subsample: algorithm 'evox.algorithms.DE'"),
    ({"algorithm": {"name": "evogm_pareto"}, "objectives": "pareto"}, "subsample: algorithm 'evogm_pareto'"),
    ({"objectives": "pareto"}, "subsample: needs objectives: mean"),
    ({"racing": {}}, "subsample: not with racing"),
    ({"subsample": {"size": 1.5}}, "subsample.size"),
])
def test_config_refuses_what_subsample_mode_cannot_keep_paired(overrides, message):
    config = {"base": "nowhere", "experts": ["a", "b"], "tasks": [], "subsample": {"size": 4}, **overrides}
    with pytest.raises(MergeInputError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(config)


@pytest.fixture(scope="module")
def search_problem(tiny_setup, tiny_experts):
    parts = [split_task(read_task(spec), 0.3) for spec in tiny_setup.tasks]
    problem = MergeProblem(tiny_experts, [search for search, _ in parts], batch_size=8)
    return problem.normalise(anchor_normalisation(problem))


def test_a_subset_scorer_gives_the_full_scorers_values_for_its_examples(search_problem):
    torch.manual_seed(0)
    candidate = torch.randn(1, search_problem.dim) * 0.5
    indices = [torch.tensor([0, 2, 5]), torch.tensor([1, 3, 4]), torch.tensor([6, 7, 0]).sort().values]
    with search_problem.recording_example_parts() as full:
        search_problem.evaluate_per_task(candidate)
    with search_problem.scoring_on(search_problem.subset_scorers(indices)):
        with search_problem.recording_example_parts() as subset:
            search_problem.evaluate_per_task(candidate)
    for (num, den), (sub_num, sub_den), index in zip(full, subset, indices):
        assert torch.allclose(num[index], sub_num, atol=1e-9) and torch.allclose(den[index], sub_den)


def test_estimates_stand_against_the_anchors_as_on_the_shared_examples(search_problem):
    totals = [len(task.records) for task in search_problem.tasks]
    assert totals == [8, 8, 8]  # size 4: two disjoint subsets cover each search part
    subsampler = Subsampler(SubsampleSettings(4, elites=2, seed=1), search_problem.task_names, totals)
    torch.manual_seed(1)
    populations = [torch.rand(5, search_problem.dim) * 2 - 1 for _ in range(4)]
    raw = []
    for generation, pop in enumerate(populations):
        subsampler.begin(generation)
        raw.append(subsampler.evaluate(search_problem, pop)[0])
        if generation == 0:  # no anchors yet: the estimates are the scores on the subset
            assert torch.allclose(subsampler._estimates(), raw[0], atol=1e-12)
    generations = subsampler._generations
    anchors = [i for i, g in enumerate(generations) if len(g) > 1]
    assert len(anchors) >= 2
    table = subsampler._estimates()
    for h in range(4):
        members = [i for i, g in enumerate(generations) if g == [h]]
        around = [i for i in anchors if h in generations[i]]
        if not around:
            continue
        shared = torch.stack([subsampler._sums[i][generations[i].index(h)] for i in around])
        on_subset = shared[..., 0] / shared[..., 1]
        for i in members:  # estimate - anchors' mean estimate == paired difference on S_h
            x = subsampler._sums[i][0]
            paired = x[:, 0] / x[:, 1] - on_subset.mean(0)
            assert torch.allclose(table[i] - table[around].mean(0), paired, atol=1e-12)
    # an anchor scored on both blocks of an epoch has seen the whole search part: its estimate is its full score
    whole = [i for i in anchors if {0, 1} <= set(generations[i]) and len(generations[i]) == 2]
    assert whole
    full = search_problem.evaluate_per_task(torch.stack([subsampler._coefficients[i] for i in whole]))
    assert torch.allclose(table[whole], full, atol=1e-9)


def _ledger_fitness(subsampler, problem, rows):
    values, known = subsampler.fitness_of(problem, rows)
    return -values.float(), known  # as the algorithm holds it: minimised


@pytest.mark.parametrize("name", ["evogm", "pso", "random", "cmaes"])
def test_algorithms_hold_the_current_estimates(search_problem, name):
    algorithm = build_algorithm(name, search_problem.dim, pop_size=4, seed=2,
                                params=FAST_EVOGM if name == "evogm" else {})
    subsampler = Subsampler(SubsampleSettings(3, elites=2, seed=2), search_problem.task_names,
                            [len(task.records) for task in search_problem.tasks])
    monitor = RunMonitor(search_problem.task_names, search_problem.aggregate, [])
    workflow = build_workflow(algorithm, search_problem, monitor, subsample=subsampler)
    run_generations(workflow, monitor, 0, 6)
    algorithm = workflow.algorithm  # the workflow's copy holds the state
    held = lambda rows: _ledger_fitness(subsampler, search_problem, rows)  # noqa: E731
    if name == "evogm":  # its whole archive and its population
        expected, known = held(algorithm.history.original_coefficients)
        assert bool(known.all()) and torch.equal(algorithm.history.fitness, expected)
        assert torch.equal(algorithm.fit.cpu(), algorithm.history.fitness[algorithm._pop_index])
    elif name == "pso":  # every particle's best and the swarm's
        expected, known = held(algorithm.local_best_location)
        assert bool(known.all()) and torch.equal(algorithm.local_best_fit.cpu(), expected)
        best, known = held(algorithm.global_best_location[None])
        assert bool(known[0]) and float(algorithm.global_best_fit) == float(best[0])
    elif name == "random":
        best, known = held(algorithm.best_coefficients[None])
        assert bool(known[0]) and float(algorithm.best_fitness) == float(best[0])
    # every generation but the first re-scored the elites (those not in its population) on its subset
    rescored = {r["generation"]: r["subset"]["rescored"] for r in monitor.records}
    assert rescored[0] == [] and all(1 <= len(rescored[g]) <= 2 for g in range(1, 6))
    assert subsampler.rescorings == sum(map(len, rescored.values())) and subsampler.candidates == 24


def test_an_algorithm_it_cannot_keep_paired_is_refused(search_problem):
    from evox_merge.algorithms.multi_objective import MergeNSGA2

    subsampler = Subsampler(SubsampleSettings(3), search_problem.task_names, [8, 8, 8])
    with pytest.raises(MergeInputError, match="subsample: MergeNSGA2"):
        build_workflow(MergeNSGA2(search_problem.dim, pop_size=4, n_objs=2), search_problem, subsample=subsampler)


def _subsample_config(tiny_setup, out, name):
    return search_config(tiny_setup, out, subsample={"size": 3, "elites": 2}, release={"baselines": False},
                         algorithm={"name": name, "pop_size": 4, "params": FAST_EVOGM if name == "evogm" else {}})


def _without_timing(records):
    return [{key: value for key, value in record.items() if key != "seconds"} for record in records]


@pytest.mark.parametrize("name", ["evogm", "pso"])
def test_a_subsample_run_resumes_bit_identically(tiny_setup, tmp_path, monkeypatch, name):
    straight = run_search(_subsample_config(tiny_setup, tmp_path / "straight", name), progress="quiet")
    import evox_merge.run.search as search_module

    saved = search_module.save_checkpoint
    calls = []

    def stop_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        saved(*args, **kwargs)

    config = _subsample_config(tiny_setup, tmp_path / "stopped", name)
    monkeypatch.setattr(search_module, "save_checkpoint", stop_after_three)
    with pytest.raises(SearchInterrupted) as stopped:
        run_search(config, progress="quiet")
    assert stopped.value.generation == 3
    assert len(read_records(tmp_path / "stopped" / "records.jsonl")) == 16  # the 4th generation, past the checkpoint
    monkeypatch.setattr(search_module, "save_checkpoint", saved)
    resumed = run_search(config, resume=True, progress="quiet")

    records = read_records(tmp_path / "straight" / "records.jsonl")
    assert _without_timing(read_records(tmp_path / "stopped" / "records.jsonl")) == _without_timing(records)
    assert resumed.best_coefficients == straight.best_coefficients and resumed.best_fitness == straight.best_fitness
    assert resumed.release == straight.release
    assert resumed.recipe["subsample"] == straight.recipe["subsample"]
    # each record says which subset it was scored on, its score there and the estimate the algorithm got
    for record in records:
        assert record["subset"]["id"] == record["generation"] and record["examples_scored"] == 9
        assert record["subset"]["examples"] == {"choice": 3, "copy": 3, "text": 3}
        assert record["examples_total"] == sum(straight.recipe["subsample"]["search_part"].values())
    assert all(r["subset"]["rescored"] == [] and r["fitness"] == pytest.approx(r["subset_fitness"], abs=1e-12)
               for r in records[:4])
    assert all(len(r["subset"]["rescored"]) >= 1 for r in records[4:])


def test_the_release_is_chosen_and_reported_on_the_full_search_part(tiny_setup, tmp_path):
    result = run_search(_subsample_config(tiny_setup, tmp_path / "run", "cmaes"), progress="quiet")
    recipe = json.loads((result.output_dir / "recipe.json").read_text())
    pool = recipe["subsample"]["release_pool"]
    records = read_records(result.output_dir / "records.jsonl")
    assert len(pool) == 5 and recipe["subsample"]["rescorings"] == sum(
        len(r["subset"]["rescored"]) for r in records[::4])
    assert recipe["subsample"]["distinct_examples_seen"] == recipe["subsample"]["search_part"]  # 6 x 3 >= 8
    searched = {c["name"]: c["search_fitness"] for c in recipe["selection"]["candidates"] if c["kind"] == "searched"}
    assert searched == {f"record:{entry['id']}": entry["fitness"] for entry in pool}
    best = recipe["selection"]["best_searched"]
    scores = recipe["evaluation"]["scores"]["best_searched"]["search"]  # scored again by the score table
    entry = next(e for e in pool if f"record:{e['id']}" == best)
    assert scores["normalised"] == pytest.approx(entry["fitness"], abs=1e-9)
    assert {name: scores[name] for name in entry["task_scores"]} == pytest.approx(entry["task_scores"], abs=1e-9)
