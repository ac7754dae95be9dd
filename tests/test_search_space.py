"""One search space for every algorithm (issue 29, point 1) and searches that start from the tuned static merges
(point 2): the box holds for every registered algorithm, EvoGM's after a basis shift too; a static start evaluates
the starting points first and never ends below them; recipe.json records the box and the start."""

import json

import pytest
import torch
from evox.core import Problem

from evox_merge.algorithms import limits
from evox_merge.algorithms.cmaes import SIGMA_RANGE, start_sigma
from evox_merge.algorithms.common import initial_points
from evox_merge.algorithms.evogm_basis import RoundBasis
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.static_merges import DEFAULT_SCALINGS, STATIC_MERGES, on_grid_edge, task_arithmetic
from evox_merge.problems.static_names import LINEAR_STATIC_MERGES
from evox_merge.run import registry
from evox_merge.run.loop import search
from evox_merge.run.search import run_search
from evox_merge.run.selection import static_candidates
from evox_merge.run.workflow import build_workflow
from evox_merge.util.errors import MergeInputError

from test_search import search_config

SINGLE = [name for name, entry in registry.ALGORITHMS.items() if not entry.multi_objective]
MULTI = [name for name, entry in registry.ALGORITHMS.items() if entry.multi_objective]
SMALL_EVOGM = {"train_steps": 5, "hidden_sizes": [16, 16], "num_rounds": 3, "iterations_per_round": 1}


def params_for(name: str) -> dict:
    return SMALL_EVOGM if registry.is_evogm(name) else {}


class FarOptimum(Problem):
    """Maximise -||x - 2.5||^2 (or two such objectives): the optimum lies outside the box, so every algorithm
    presses against its upper face; keeps every population it was given."""

    def __init__(self, objectives: int = 1):
        super().__init__()
        self.objectives = objectives
        self.seen: list[torch.Tensor] = []

    def evaluate(self, pop: torch.Tensor) -> torch.Tensor:
        self.seen.append(pop.detach().clone())
        near = -((pop - 2.5) ** 2).sum(-1)
        if self.objectives == 1:
            return near
        return torch.stack([near, -((pop + 0.5) ** 2).sum(-1)], dim=1)


@pytest.mark.parametrize("name", SINGLE + MULTI)
def test_every_registered_algorithm_hands_the_problem_only_points_of_the_box(name):
    lb, ub = -1.0, 1.5
    multi = registry.ALGORITHMS[name].multi_objective
    problem = FarOptimum(2 if multi else 1)
    shifts = registry.is_evogm(name) and name != "evogm_no_rounds"
    algorithm = registry.build_algorithm(name, 4, pop_size=12 if multi else 10 if shifts else 6, lb=lb, ub=ub,
                                         seed=2, params=params_for(name), n_objs=2 if multi else None)
    workflow = build_workflow(algorithm, problem)
    workflow.init_step()
    for _ in range(5):
        workflow.step()
    seen = torch.cat(problem.seen)
    assert ((seen >= lb) & (seen <= ub)).all(), (name, seen.min(), seen.max())
    if name in ("cmaes", "pso"):  # they follow the fitness to the face within 6 generations
        assert (seen >= ub - 1e-6).any(), "the optimum beyond the box pushes candidates onto its face"
    elif shifts:
        evogm = workflow.algorithm
        assert len(evogm.bases) >= 3, "the test needs basis shifts"
        # candidates whose merge the basis shift alone put outside the box (the paper's c) were projected back
        assert evogm.recipe_facts()["repaired_into_box"] > 0


def test_round_basis_repair_projects_the_merge_into_the_box_and_keeps_the_coordinates_exact():
    lb, ub = -torch.ones(3), torch.ones(3)
    basis = RoundBasis(3, lb, ub)
    basis.bases.append(torch.tensor([[0.9, 0.8, 0.0], [0.0, 0.9, 0.7], [0.6, 0.0, 0.9]]))
    lam = torch.tensor([[1.0, 1.0, 1.0], [0.1, -0.2, 0.3], [-1.0, -1.0, 1.0]])
    repaired = basis.repair(lam)
    original = lam @ basis.current
    assert (original.abs() > 1).any(), "the test needs a merge outside the box"
    torch.testing.assert_close(repaired @ basis.current, torch.clamp(original, -1, 1), rtol=0, atol=1e-5)
    assert torch.equal(repaired[1], lam[1]), "a merge inside the box is left alone"
    assert torch.equal(basis.to_original(repaired), torch.clamp(basis.to_original(repaired), -1, 1))


def test_one_default_box_everywhere():
    from evox_merge.run.config import AlgorithmConfig

    assert (AlgorithmConfig().lb, AlgorithmConfig().ub) == (limits.DEFAULT_LB, limits.DEFAULT_UB)
    assert AlgorithmConfig().start == limits.DEFAULT_START
    for name in SINGLE:
        built = registry.build_algorithm(name, 4, pop_size=6, params=params_for(name))
        assert float(built.lb.min()) == limits.DEFAULT_LB and float(built.ub.max()) == limits.DEFAULT_UB, name
    # the tuned task-arithmetic scale always lies inside the default box, so a static start is not clipped
    assert limits.DEFAULT_LB <= min(DEFAULT_SCALINGS) and max(DEFAULT_SCALINGS) <= limits.DEFAULT_UB


def test_grid_edge_flag():
    assert on_grid_edge(1.0, (0.5, 1.0)) and on_grid_edge(0.5, (0.5, 1.0)) and not on_grid_edge(0.7, (0.5, 0.7, 1))
    assert not on_grid_edge(0.5, (0.5,))


@pytest.fixture(scope="module")
def problem(tiny_setup, tiny_experts):
    return MergeProblem(tiny_experts, tiny_setup.tasks[:2])


@pytest.fixture(scope="module")
def starts(problem):
    statics = static_candidates(problem, [n for n in STATIC_MERGES if n not in ("ties", "dare")])
    initial, names = registry.start_points(statics)
    return statics, initial, names


def test_start_points_are_the_linear_static_merges_best_first(starts, problem):
    statics, initial, names = starts
    fitness = {c.name: c.search_fitness for c in statics}
    assert set(names) == {c.name for c in statics if c.merge.coefficients is not None}
    assert {c.name for c in statics if c.merge.coefficients is not None} == set(LINEAR_STATIC_MERGES)
    assert [fitness[n] for n in names] == sorted((fitness[n] for n in names), reverse=True)
    assert initial.shape == (len(names), problem.num_experts)
    grid = task_arithmetic(problem)
    assert "on_grid_edge" in grid.settings and grid.settings["scaling"] in DEFAULT_SCALINGS
    with pytest.raises(MergeInputError, match="initial"):
        initial_points(torch.ones(2, 3), 4)


@pytest.mark.parametrize("name", SINGLE)
def test_a_static_start_evaluates_the_starting_points_first_and_never_ends_below_them(name, problem, starts):
    statics, initial, names = starts
    algorithm = registry.build_algorithm(name, problem.num_experts, pop_size=6, seed=1, params=params_for(name),
                                         initial=initial, n_objs=None)
    records = search(algorithm, problem, 3).records
    first = torch.tensor([r["coefficients"] for r in records[:6]])
    for row in initial:
        assert (first == row).all(-1).any(), f"{name}: starting point {row.tolist()} not in the first generation"
    best_start = max(c.search_fitness for c in statics if c.name in names)
    best = max(r["fitness"] for r in records if r["fitness"] is not None)
    assert best >= best_start - 1e-6, (name, best, best_start)  # the same merge scored again: equal up to rounding


def test_cmaes_starts_at_the_best_starting_point_with_a_step_from_their_spread(starts):
    _, initial, _ = starts
    cmaes = registry.build_algorithm("cmaes", initial.shape[1], pop_size=6, initial=initial)
    torch.testing.assert_close(cmaes.mean[0], initial[0])
    width = limits.DEFAULT_UB - limits.DEFAULT_LB
    spread = float(((initial[1:] - initial[0]) ** 2).mean().sqrt())
    assert float(cmaes.sigma) == pytest.approx(min(max(spread, SIGMA_RANGE[0] * width), SIGMA_RANGE[1] * width))
    lb, ub = torch.full((3,), -1.0), torch.full((3,), 1.0)
    assert start_sigma(None, lb, ub) == pytest.approx(0.5) == start_sigma(torch.zeros(1, 3), lb, ub)
    assert start_sigma(torch.tensor([[0.0] * 3, [0.01] * 3]), lb, ub) == pytest.approx(0.1)


def test_an_algorithm_without_starting_points_refuses_them():
    assert registry.takes_starting_points("cmaes") and not registry.takes_starting_points("nsga2")
    with pytest.raises(MergeInputError, match="starting points"):
        registry.build_algorithm("nsga2", 3, pop_size=12, n_objs=2, initial=torch.zeros(1, 3))


@pytest.mark.parametrize("start", ["static", "default"])
def test_the_recipe_records_the_box_and_the_start(tiny_setup, tmp_path, start):
    config = search_config(tiny_setup, tmp_path / "out", budget={"generations": 2},
                           algorithm={"name": "cmaes", "pop_size": 4, "lb": -1.0, "ub": 1.5, "start": start})
    result = run_search(config, progress="quiet")
    recipe = json.loads((result.output_dir / "recipe.json").read_text())
    facts = recipe["search"]
    assert facts["box"]["lb"] == -1.0 and facts["box"]["ub"] == 1.5 and facts["start"] == start
    records = [json.loads(line) for line in (result.output_dir / "records.jsonl").read_text().splitlines()]
    assert all(-1.0 <= c <= 1.5 for r in records for c in r["coefficients"])
    if start == "static":
        names = [p["name"] for p in facts["starting_points"]]
        assert "task_arithmetic" in names and len(names) >= 3
        statics = {c["name"]: c for c in recipe["selection"]["candidates"] if c["kind"] == "static"}
        first = [r["coefficients"] for r in records[:4]]
        for point in facts["starting_points"]:
            assert point["coefficients"] in first
            # tuned once, before the search: the contest's static merge is the same tuning
            assert point["search_fitness"] == statics[point["name"]]["search_fitness"]
    else:
        assert facts["starting_points"] == []
