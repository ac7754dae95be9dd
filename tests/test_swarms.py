"""PSO-Merging (arXiv 2508.19839) and Model Swarms (arXiv 2410.11163) on the synthetic landscapes."""

import pytest
import torch
from evox.core import Problem
from evox.workflows import EvalMonitor, StdWorkflow

from evox_merge.algorithms import ModelSwarms, PSOMerging
from evox_merge.experts.spaces import LayerSpace
from evox_merge.problems.landscapes import SmoothLandscape
from evox_merge.run import registry
from evox_merge.util.errors import MergeInputError
from tests.recording import Recording

SWARMS = [PSOMerging, ModelSwarms]


def _run(algorithm, problem: Problem, steps: int) -> StdWorkflow:
    workflow = StdWorkflow(algorithm, problem, opt_direction="max")
    workflow.init_step()
    for _ in range(steps):
        workflow.step()
    return workflow


@pytest.mark.parametrize("starts", [False, True], ids=["default_start", "static_start"])
@pytest.mark.parametrize("algorithm_cls", SWARMS)
def test_state_dict_resumes_a_run_bit_identically(algorithm_cls, starts, tmp_path):
    initial = torch.tensor([[0.3] * 5, [1.0, 0, 0, 0, 0]]) if starts else None

    def workflow_for() -> tuple[StdWorkflow, Recording]:
        problem = Recording(SmoothLandscape(5, seed=0))
        return StdWorkflow(algorithm_cls(5, pop_size=8, seed=2, initial=initial), problem, opt_direction="max"), problem

    reference, reference_problem = workflow_for()
    reference.init_step()
    for _ in range(12):  # long enough for Model Swarms' restarts and its step-length floor
        reference.step()
    interrupted, _ = workflow_for()
    interrupted.init_step()
    for _ in range(6):
        interrupted.step()
    torch.save(interrupted.state_dict(), tmp_path / "checkpoint.pt")
    resumed, resumed_problem = workflow_for()
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    for _ in range(6):
        resumed.step()
    assert torch.equal(torch.cat(resumed_problem.populations), torch.cat(reference_problem.populations[7:]))
    for name, value in reference.algorithm.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed.algorithm.state_dict()[name]), name


@pytest.mark.parametrize("algorithm_cls", SWARMS)
def test_every_candidate_lies_in_the_box(algorithm_cls):
    outside = SmoothLandscape(4, condition_number=1.0, optimum=torch.tensor([1.5, -1.2, 0.9, 2.0]))
    problem = Recording(outside)
    initial = torch.tensor([[2.0, -2.0, 0.0, 0.3]])  # a starting point outside the box is repaired into it
    _run(algorithm_cls(4, pop_size=10, lb=-0.5, ub=0.5, seed=1, initial=initial), problem, 30)
    seen = torch.cat(problem.populations)
    assert seen.min() >= -0.5 and seen.max() <= 0.5
    assert torch.equal(problem.populations[0][0], torch.tensor([0.5, -0.5, 0.0, 0.3]))
    assert [len(pop) for pop in problem.populations] == [10] * 31, "one generation of pop_size per step"


def test_pso_merging_starts_from_the_starting_points_then_base_experts_and_sparsified_experts():
    initial = torch.tensor([[0.4, 0.4, 0.4], [1.0, 0.0, 0.0]])  # the second repeats expert 0: dropped there
    problem = Recording(SmoothLandscape(3, seed=0))
    _run(PSOMerging(3, pop_size=10, seed=0, density=0.25, initial=initial), problem, 1)
    first = problem.populations[0]
    eye = torch.eye(3)
    expected = torch.cat([initial, torch.zeros(1, 3), eye[1:], 0.25 * eye])
    assert torch.equal(first[:8], expected)
    extra = first[8:]  # sparsified experts 0 and 1 with random densities in (0, 1)
    assert torch.equal(extra[:, 2], torch.zeros(2)) and (extra.sum(-1) > 0).all() and (extra.max(-1).values < 1).all()
    assert not any(bool((later == row).all(-1).any()) for later in problem.populations[1:] for row in initial[:1])


def test_model_swarms_starts_from_the_starting_points_then_experts_and_their_crossovers():
    initial = torch.tensor([[0.4, 0.4, 0.4]])
    problem = Recording(SmoothLandscape(3, seed=0))
    _run(ModelSwarms(3, pop_size=12, seed=0, initial=initial), problem, 1)
    first = problem.populations[0]
    assert torch.equal(first[:4], torch.cat([initial, torch.eye(3)]))
    # Children w a + (1 - w) b of two parents among the first four: their coefficients sum to that of the parents'
    # mixture (1 for two experts, 1.2 with the starting point), unless clipped into the box.
    children = first[4:]
    inside = ((children > -0.5) & (children < 1.5)).all(-1)
    sums = children[inside].sum(-1)
    assert inside.any() and bool(((sums - 1).abs() < 1e-5).logical_or((sums - 1.2).abs() < 0.2 + 1e-5).all())


@pytest.mark.parametrize("algorithm_cls", SWARMS)
def test_the_first_particles_are_the_same_merges_in_the_layer_space(algorithm_cls):
    layers = [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
    space = LayerSpace.build(layers, ["a", "b"], groups=2)
    algorithm = algorithm_cls(space.dim, pop_size=8, seed=0, space=space)
    experts = space.from_expert(torch.eye(2)).float()
    rows = algorithm.pop
    assert all(bool((rows == expert).all(-1).any()) for expert in experts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pso_merging_solves_a_smooth_landscape(seed):
    landscape = SmoothLandscape(4, seed=seed, condition_number=10.0, optimum=torch.tensor([0.35, 0.25, 0.3, 0.1]))
    monitor = EvalMonitor(full_fit_history=False)
    workflow = StdWorkflow(PSOMerging(4, pop_size=16, seed=seed), landscape, monitor=monitor, opt_direction="max")
    workflow.init_step()
    start = monitor.get_best_fitness().item()
    for _ in range(60):
        workflow.step()
    assert start < -0.05 and monitor.get_best_fitness().item() > -1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_model_swarms_closes_in_on_a_smooth_landscape_optimum(seed):
    # Model Swarms contracts onto the segment between each personal best and the global best (restarts return a
    # stale particle to its best), so it closes in on the optimum without the last digits of PSO.
    landscape = SmoothLandscape(4, seed=seed, condition_number=10.0, optimum=torch.tensor([0.35, 0.25, 0.3, 0.1]))
    monitor = EvalMonitor(full_fit_history=False)
    workflow = StdWorkflow(ModelSwarms(4, pop_size=16, seed=seed), landscape, monitor=monitor, opt_direction="max")
    workflow.init_step()
    start = monitor.get_best_fitness().item()
    for _ in range(60):
        workflow.step()
    assert monitor.get_best_fitness().item() > max(start / 5, -0.03)


def test_model_swarms_step_length_decays_to_its_floor_and_stale_particles_restart():
    algorithm = ModelSwarms(3, pop_size=6, seed=0, step_length=1.0, step_decay=0.5, min_step=0.2,
                            restart_patience=2)
    workflow = _run(algorithm, SmoothLandscape(3, seed=0), 4)
    assert workflow.algorithm.step_length.item() == pytest.approx(0.2)
    flat = type("Flat", (Problem,), {"evaluate": lambda self, pop: torch.zeros(len(pop))})()
    algorithm = ModelSwarms(3, pop_size=6, seed=0, restart_patience=2)
    workflow = _run(algorithm, flat, 1)  # nothing improves: every particle's best is now 2 evaluations old
    best = workflow.algorithm.local_best_location.clone()
    worst = workflow.algorithm.global_worst_location.clone()
    global_best = workflow.algorithm.global_best_location.clone()
    workflow.step()
    moved = workflow.algorithm.pop
    # A restarted particle moves from its best along g - p and p - g_w only (no inertia, no pull to itself).
    for i in range(6):
        directions = torch.stack([global_best - best[i], best[i] - worst])
        coefficients = torch.linalg.lstsq(directions.T, (moved[i] - best[i])[:, None]).solution
        assert torch.allclose(directions.T @ coefficients, (moved[i] - best[i])[:, None], atol=1e-5)


class HalfNaN(Problem):
    """A sphere that returns NaN wherever the first coefficient is positive."""

    def evaluate(self, pop: torch.Tensor) -> torch.Tensor:
        return torch.where(pop[:, 0] > 0, torch.nan, -(pop**2).sum(-1))


@pytest.mark.parametrize("algorithm_cls", SWARMS)
def test_nan_fitness_never_becomes_a_best_or_the_worst(algorithm_cls):
    workflow = _run(algorithm_cls(4, pop_size=10, seed=0), HalfNaN(), 10)
    algorithm = workflow.algorithm
    assert torch.isfinite(algorithm.global_best_fit) and algorithm.global_best_location[0] <= 0
    if isinstance(algorithm, ModelSwarms):
        assert torch.isfinite(algorithm.global_worst_fit) and algorithm.global_worst_location[0] <= 0


@pytest.mark.parametrize("algorithm_cls", SWARMS)
def test_a_seed_fixes_the_run_whatever_the_global_rng(algorithm_cls):
    def populations(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        problem = Recording(SmoothLandscape(5, seed=0))
        _run(algorithm_cls(5, pop_size=8, seed=seed), problem, 5)
        return torch.cat(problem.populations)

    assert torch.equal(populations(1, 0), populations(1, 99))
    assert not torch.equal(populations(1, 0), populations(2, 0))


@pytest.mark.parametrize("name, params, key", [
    ("pso_merging", {"density": 0.0}, "density"), ("pso_merging", {"density": 1.5}, "density"),
    ("pso_merging", {"c1": -1.0}, "c1"), ("pso_merging", {"w": float("nan")}, "w"),
    ("model_swarms", {"step_decay": 1.5}, "step_decay"), ("model_swarms", {"step_length": 0}, "step_length"),
    ("model_swarms", {"restart_patience": 0}, "restart_patience"), ("model_swarms", {"repel": -0.1}, "repel"),
    ("model_swarms", {"inertia": 0, "cognitive": 0, "social": 0, "repel": 0}, "repel"),
])
def test_the_classes_refuse_what_the_config_refuses(name, params, key):
    problems = registry.argument_problems(name, 8, params)
    assert problems and problems[0].startswith(f"algorithm.params.{key}:")
    with pytest.raises(MergeInputError, match=key):
        registry.build_algorithm(name, 3, pop_size=8, params=params)
    if name == "model_swarms" and key == "repel" and len(params) == 4:  # three zero pulls leave one: it runs
        assert not registry.argument_problems(name, 8, {**params, "social": 0.1})
        registry.build_algorithm(name, 3, pop_size=8, params={**params, "social": 0.1})


def test_both_are_listed_and_take_starting_points():
    for name in ("pso_merging", "model_swarms"):
        assert name in registry.algorithm_names() and registry.takes_starting_points(name)
        assert not registry.is_multi_objective(name)
