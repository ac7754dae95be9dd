"""Many objectives: Pareto helpers on hand-made points, the exact hypervolume, objective normalisation, EvoX's
multi-objective algorithms and Pareto EvoGM on a 2-objective landscape and on MergeProblem, and a Pareto search
end to end (release folders reloaded with PEFT and re-scored, evidence on every record, the lineage command)."""

import json

import pytest
import torch
import yaml
from evox.core import Problem

from evox_merge.algorithms import EvoGM
from evox_merge.algorithms.pareto import (
    ParetoArchive, crowding_distance, dominates, hypervolume, non_dominated_rank, pareto_order, split_pareto_winners,
)
from evox_merge.cli import main
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.normalisation import normalisation_from_anchors
from evox_merge.run import registry
from evox_merge.run.evidence import RUN_EVIDENCE_FIELDS, full_record
from evox_merge.run.loop import search
from evox_merge.run.monitor import EVIDENCE_FIELDS, read_records
from evox_merge.run.objectives import hypervolume_by_generation, objectives_from_config
from evox_merge.run.search import run_search
from evox_merge.run.workflow import build_workflow

MULTI = [name for name, entry in registry.ALGORITHMS.items() if entry.multi_objective]
FAST_EVOGM = {"train_steps": 10, "hidden_sizes": [16, 16, 16, 16, 16], "num_rounds": 2, "iterations_per_round": 2}


def params_for(name):
    return FAST_EVOGM if registry.is_evogm(name) else {}


def pop_for(name):
    return 16 if name == "moead" else 6  # MOEA/D needs >= 11 weight vectors (docs/evox.md)


# --- dominance, ranks, crowding, archive ----------------------------------------------------------------------


def test_dominance_and_non_dominated_ranks_on_hand_made_points():
    points = torch.tensor([[1.0, 4.0], [2.0, 2.0], [4.0, 1.0], [3.0, 3.0], [5.0, 5.0], [2.0, 2.0],
                           [float("nan"), 0.0]])
    assert bool(dominates(points[1], points[3])) and not bool(dominates(points[3], points[1]))
    assert not bool(dominates(points[1], points[5]))  # equal points do not dominate each other
    assert not bool(dominates(points[0], points[2]))  # a trade-off
    assert bool(dominates(points[4], points[6])) and not bool(dominates(points[6], points[4]))  # NaN is worst
    assert non_dominated_rank(points).tolist() == [0, 0, 0, 1, 2, 0, 3]


def test_crowding_distance_on_hand_made_points():
    front = torch.tensor([[0.0, 4.0], [1.0, 2.0], [3.0, 1.0], [4.0, 0.0]])
    distance = crowding_distance(front)
    assert distance[0] == torch.inf and distance[3] == torch.inf
    assert distance[1].item() == pytest.approx(3 / 4 + 3 / 4)  # (3 - 0) / 4 on both objectives
    assert distance[2].item() == pytest.approx(3 / 4 + 2 / 4)
    assert crowding_distance(front[:2]).tolist() == [torch.inf, torch.inf]
    # Order: rank first, then crowding (extremes first), then age.
    points = torch.cat([front, torch.tensor([[5.0, 5.0]])])
    assert pareto_order(points).tolist() == [0, 3, 1, 2, 4]
    winners, losers = split_pareto_winners(points, 0.4)
    assert winners.tolist() == [0, 3] and losers.tolist() == [1, 2, 4]


def test_archive_keeps_exactly_the_non_dominated_points():
    archive = ParetoArchive()
    assert archive.update(["a", "b", "c"], torch.tensor([[2.0, 2.0], [1.0, 3.0], [3.0, 3.0]])) == ["a", "b"]
    assert archive.ids == ["a", "b"]
    archive.update(["d"], torch.tensor([[1.0, 1.0]]))  # dominates both
    assert archive.ids == ["d"]
    archive.update(["e", "f", "g"], torch.tensor([[1.0, 1.0], [0.5, 2.0], [float("inf"), 0.0]]))
    assert archive.ids == ["d", "f"]  # an equal point does not enter; an invalid one never does
    assert archive.points.tolist() == [[1.0, 1.0], [0.5, 2.0]]


# --- hypervolume ---------------------------------------------------------------------------------------------------


def test_hypervolume_is_exact_on_known_fronts():
    ref = torch.tensor([4.0, 4.0])
    assert hypervolume(torch.tensor([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]), ref) == pytest.approx(6.0)
    assert hypervolume(torch.tensor([[5.0, 1.0]]), ref) == 0.0  # beyond the reference: nothing
    cube = hypervolume(torch.tensor([[0.0, 0.0, 0.0]]), torch.ones(3))
    assert cube == pytest.approx(1.0)
    two_boxes = hypervolume(torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.0, 0.0]]), torch.ones(3))
    assert two_boxes == pytest.approx(0.25 + 0.5 - 0.125)


@pytest.mark.parametrize("objectives", [2, 3])
def test_hypervolume_agrees_with_evox_monte_carlo(objectives):
    from evox.metrics import hv

    generator = torch.Generator().manual_seed(objectives)
    raw = torch.rand(12, objectives, generator=generator)
    front = raw[non_dominated_rank(raw) == 0]
    ref = torch.full((objectives,), 1.1)
    torch.manual_seed(0)
    estimate = float(hv(front.float(), ref.float(), num_sample=200_000))
    assert hypervolume(front, ref) == pytest.approx(estimate, rel=0.02)


# --- objectives ----------------------------------------------------------------------------------------------------


class KnownScores:
    """The attributes `Objectives` reads from a problem: task names, weights, normalisation."""

    def __init__(self):
        self.task_names = ["acc", "nll", "gen"]
        self.task_weights = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
        anchors = torch.tensor([[0.2, -8.0, 0.1], [0.6, -7.0, 0.1], [0.4, -4.0, 0.3]])  # base, expert a, expert b
        self.normalisation = normalisation_from_anchors(self.task_names, ["a", "b"], anchors)


def test_objectives_normalise_and_group_known_scores():
    problem = KnownScores()
    objectives = objectives_from_config(type("C", (), {"kind": "pareto", "groups": [["acc", "gen"], ["nll"]],
                                                       "challengers": 2})(), problem.task_names)
    scores = torch.tensor([[0.6, -4.0, 0.3], [0.2, -8.0, 0.1], [0.4, -6.0, float("nan")]])
    values = objectives.values(problem, scores)
    # acc: (s - 0.2) / 0.4; gen: (s - 0.1) / 0.2; nll: (s + 8) / 4. Group 0 weights 0.5 : 0.25 -> 2/3 : 1/3.
    assert values[0].tolist() == pytest.approx([1.0, 1.0])
    assert values[1].tolist() == pytest.approx([0.0, 0.0])
    assert values[2, 1].item() == pytest.approx(0.5) and torch.isnan(values[2, 0])
    assert objectives.fitness(problem, scores)[2, 0].item() == -1e6
    assert objectives.names == ("acc+gen", "nll")
    assert objectives_from_config("pareto", problem.task_names).names == ("acc", "nll", "gen")
    assert objectives_from_config("mean", problem.task_names).kind == "mean"


def test_hypervolume_per_generation_never_decreases():
    records = [{"id": i, "generation": i // 2, "objectives": {"a": a, "b": b}}
               for i, (a, b) in enumerate([(0.0, 0.0), (0.5, -0.5), (0.2, 0.2), (-2.0, 3.0), (0.6, 0.6), (0.1, 0.1)])]
    volumes = hypervolume_by_generation(records, ["a", "b"])
    assert list(volumes) == [0, 1, 2]
    assert volumes[0] == pytest.approx(1.0 + 0.75 - 0.5)  # two boxes above the reference (-1, -1), overlapping
    assert volumes[0] <= volumes[1] <= volumes[2]
    assert volumes[2] == pytest.approx(1.6 * 1.6)


# --- algorithms on a 2-objective landscape -------------------------------------------------------------------------


class TwoObjectives(Problem):
    """Maximise -|x - a|^2 and -|x - b|^2 (higher is better, as evox-merge problems are): the front is the segment."""

    def evaluate(self, pop):
        a, b = torch.full((pop.shape[1],), -0.5), torch.full((pop.shape[1],), 0.5)
        return torch.stack([-((pop - a) ** 2).sum(1), -((pop - b) ** 2).sum(1)], dim=1)


class Recording(Problem):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def evaluate(self, pop):
        self.seen.append(pop.clone())
        return self.inner.evaluate(pop)


def test_the_workflow_negates_every_objective():
    """opt_direction='max' multiplies the (P, M) matrix by a scalar -1: every objective is minimised."""
    algorithm = registry.build_algorithm("nsga2", 3, pop_size=6, seed=0, n_objs=2)
    workflow = build_workflow(algorithm, TwoObjectives())
    workflow.init_step()
    pop = workflow.algorithm.pop
    assert torch.allclose(workflow.algorithm.fit, -TwoObjectives().evaluate(pop))


@pytest.mark.parametrize("name", MULTI)
def test_multi_objective_algorithm_improves_a_two_objective_landscape(name):
    problem = Recording(TwoObjectives())
    algorithm = registry.build_algorithm(name, 3, pop_size=pop_for(name), lb=-1.0, ub=1.0, seed=1,
                                         params=params_for(name), n_objs=2)
    workflow = build_workflow(algorithm, problem)
    workflow.init_step()
    for _ in range(5):
        workflow.step()
    seen = torch.cat(problem.seen)
    assert ((seen >= -1) & (seen <= 1)).all() and torch.isfinite(seen).all()
    values = TwoObjectives().evaluate(seen)
    first = values[: algorithm.pop_size]
    ref = torch.tensor([8.0, 8.0])
    assert hypervolume(-values, ref) >= hypervolume(-first, ref)
    assert hypervolume(-values, ref) > 0


def test_multi_objective_algorithms_are_seeded():
    def run(seed):
        problem = Recording(TwoObjectives())
        workflow = build_workflow(registry.build_algorithm("nsga2", 3, pop_size=6, seed=seed, n_objs=2), problem)
        workflow.init_step()
        workflow.step()
        return torch.cat(problem.seen)

    assert torch.equal(run(4), run(4)) and not torch.equal(run(4), run(5))


def test_pareto_evogm_resumes_exactly():
    def build():
        return EvoGM(3, pop_size=6, objectives="pareto", n_objs=2, seed=2, **FAST_EVOGM)

    straight = build_workflow(build(), TwoObjectives())
    straight.init_step()
    for _ in range(4):
        straight.step()
    half = build_workflow(build(), TwoObjectives())
    half.init_step()
    half.step()
    state = half.state_dict()
    resumed = build_workflow(build(), TwoObjectives())
    resumed.load_state_dict(state)
    for _ in range(3):
        resumed.step()
    assert torch.equal(resumed.algorithm.history.original_coefficients, straight.algorithm.history.original_coefficients)
    assert resumed.algorithm.history.fitness.shape == (30, 2)


def test_pareto_evogm_ranks_by_front_and_scalar_is_the_ablation():
    pareto = EvoGM(3, pop_size=6, objectives="pareto", n_objs=2, seed=0, **FAST_EVOGM)
    scalar = EvoGM(3, pop_size=6, seed=0, **FAST_EVOGM)
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.6], [0.4, 0.4], [2.0, 2.0]])
    # A scalar sum ranks (0.4, 0.4) first; the Pareto order puts the three non-dominated points first.
    assert set(pareto._order(points)[:3].tolist()) == {0, 1, 3}
    assert scalar._order(points.sum(1))[0].item() == 3
    with pytest.raises(Exception, match="objectives"):
        EvoGM(3, objectives="pareto", n_objs=0)


# --- on MergeProblem -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merge_problem(tiny_experts, tiny_setup):
    return MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=8)


@pytest.mark.parametrize("name", MULTI)
def test_multi_objective_algorithm_runs_on_merge_problem(name, merge_problem):
    objectives = objectives_from_config("pareto", merge_problem.task_names)
    algorithm = registry.build_algorithm(name, merge_problem.num_experts, pop_size=pop_for(name), seed=0,
                                         params=params_for(name), n_objs=len(objectives.names))
    monitor = search(algorithm, merge_problem, 2, objectives=objectives, objective_fitness=True)
    assert len(monitor.records) == 2 * algorithm.pop_size  # MOEA/D rounds pop_size to its weight vectors
    assert all(set(r["objectives"]) == set(merge_problem.task_names) for r in monitor.records)
    assert all(set(EVIDENCE_FIELDS) <= set(r) for r in monitor.records)
    if registry.is_evogm(name):
        assert monitor.records[-1]["parents"][0].startswith("record:")
    else:
        assert {r["parents"] for r in monitor.records} == {"none"}


# --- a Pareto search end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pareto_run(tiny_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("pareto") / "out"
    config = {
        "base": str(tiny_setup.base_dir), "experts": [str(p) for p in tiny_setup.adapter_dirs],
        "tasks": [spec.to_dict() for spec in tiny_setup.tasks],
        "algorithm": {"name": "evogm_pareto", "pop_size": 4, "params": FAST_EVOGM},
        "budget": {"generations": 6}, "seed": 3, "batch_size": 8, "output_dir": str(out), "intended_use": "tests",
        "objectives": {"kind": "pareto", "groups": [["choice", "copy"], ["text"]], "challengers": 2},
    }
    return run_search(config, progress="quiet"), config


@pytest.mark.slow
def test_pareto_packet_has_champion_specialists_and_front(pareto_run):
    result, _ = pareto_run
    out = result.output_dir
    recipe = json.loads((out / "recipe.json").read_text())
    assert not (out / "best").exists() and (out / "champion" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "champion" / "recipe.json").read_text()) == recipe
    assert recipe["release_files"]["adapter"] == "champion/adapter"
    folders = {m["folder"] for m in recipe["pareto"]["members"]}
    assert {"specialists/choice+copy", "specialists/text"} <= folders
    for member in recipe["pareto"]["members"]:
        own = json.loads((out / member["folder"] / "recipe.json").read_text())
        assert own["release"]["role"] == member["role"] and own["release"]["coefficients"] == member["coefficients"]
        assert (out / member["folder"] / "adapter" / "adapter_model.safetensors").is_file()
    names = recipe["pareto"]["objectives"]["names"]
    specialist = {m["objective"]: m for m in recipe["pareto"]["members"] if m["role"] == "specialist"}
    for name in names:  # each specialist is the best archive member on its objective, on the selection part
        best = max(m["objectives"]["selection"][name] for m in recipe["pareto"]["members"])
        assert specialist[name]["objectives"]["selection"][name] == pytest.approx(best)
    assert (out / "pareto_front.png").stat().st_size > 0
    card = (out / "README.md").read_text()
    assert "## Pareto release" in card and "### specialists/text/" in card
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].endswith("objective_choice+copy,objective_text,hypervolume")
    volumes = [float(line.split(",")[-1]) for line in history[1:]]
    assert volumes == sorted(volumes) and volumes[-1] > 0


@pytest.mark.slow
def test_pareto_release_folders_reload_and_rescore(pareto_run, tiny_setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from evox_merge.run.evaluate import evaluate_model

    result, _ = pareto_run
    recipe = json.loads((result.output_dir / "recipe.json").read_text())
    spec_file = tmp_path / "tasks.yaml"
    spec_file.write_text(yaml.safe_dump([spec.to_dict() for spec in tiny_setup.tasks]))
    for member in recipe["pareto"]["members"]:
        adapter = result.output_dir / member["adapter"]
        scores = evaluate_model(tiny_setup.base_dir, spec_file, adapter=adapter, split="test")
        for task in ("choice", "copy", "text"):
            assert scores[task] == pytest.approx(member["scores"]["test"][task], abs=1e-5), (member["folder"], task)
    base = AutoModelForCausalLM.from_pretrained(tiny_setup.base_dir)
    assert isinstance(PeftModel.from_pretrained(base, result.output_dir / "champion" / "adapter"), PeftModel)


@pytest.mark.slow
def test_every_record_carries_every_evidence_field_and_lineage_draws_it(pareto_run, capsys):
    result, _ = pareto_run
    out = result.output_dir
    run = json.loads((out / "run.json").read_text())
    records = read_records(out / "records.jsonl")
    assert set(RUN_EVIDENCE_FIELDS) <= set(run["evidence"])
    for record in records:
        full = full_record(record, run)
        assert set(EVIDENCE_FIELDS) <= set(record) and set(RUN_EVIDENCE_FIELDS) <= set(full)
        assert full["evaluation_suite"]["task_file_hashes"] == run["task_hashes"]
        assert record["parents"] == "none" or all(p.startswith(("record:", "expert:")) for p in record["parents"])
        for parent in record["parents"] if record["parents"] != "none" else []:
            if parent.startswith("record:"):
                assert int(parent.split(":")[1]) < record["id"]  # parents were evaluated before, never invented
    assert run["evidence"]["tokenizer_compatibility"]["compatible"] is True
    assert run["evidence"]["base_family"]["model_type"] == "qwen2"
    last = records[-1]["id"]
    assert main(["lineage", str(out), "--candidate", str(last)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"record:{last} ") and "expert:" in printed
    dot = (out / f"lineage-{last}.dot").read_text()
    assert dot.startswith("digraph lineage") and f'"record:{last}"' in dot and "->" in dot
    assert main(["lineage", str(out), "--candidate", "9999"]) == 2


@pytest.mark.parametrize("name", ["nsga2", "hype"])
def test_multi_objective_algorithm_resumes_from_a_checkpoint(name, tmp_path):
    """The run's checkpoint (`run/checkpoint.py`: workflow state + global RNG) continues an EvoX MO run exactly."""
    from evox_merge.run.checkpoint import load_checkpoint, save_checkpoint

    def workflow():
        problem = Recording(TwoObjectives())
        return build_workflow(registry.build_algorithm(name, 3, pop_size=6, seed=1, n_objs=2), problem), problem

    straight, straight_problem = workflow()
    straight.init_step()
    for _ in range(3):
        straight.step()
    half, _ = workflow()
    half.init_step()
    save_checkpoint(tmp_path / "checkpoint.pt", half, {"records": 6})
    torch.rand(5)  # the global RNG moves on in between
    resumed, resumed_problem = workflow()
    load_checkpoint(tmp_path / "checkpoint.pt", resumed)
    for _ in range(2):
        resumed.step()
    resumed.step()
    assert torch.equal(torch.cat(resumed_problem.seen), torch.cat(straight_problem.seen[1:]))
