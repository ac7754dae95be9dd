"""CMA-ES / PSO wrappers, random search and plain EvoX algorithms on the synthetic landscapes."""

import pytest
import torch
from evox.algorithms import DE, PSO
from evox.core import Problem
from evox.workflows import EvalMonitor, StdWorkflow

from evox_merge.algorithms import BoundedCMAES, BoundedPSO, EvoGM, RandomSearch
from evox_merge.algorithms.cmaes import repair
from evox_merge.problems.landscapes import SmoothLandscape
from tests.recording import Recording


def _steps_to_reach(algorithm, problem, threshold: float, max_generations: int) -> int | None:
    """Generations (init_step included) until the best fitness exceeds `threshold`, or None."""
    monitor = EvalMonitor(full_fit_history=False)
    workflow = StdWorkflow(algorithm, problem, monitor=monitor, opt_direction="max")
    workflow.init_step()
    for generation in range(1, max_generations + 1):
        if generation > 1:
            workflow.step()
        if monitor.get_best_fitness().item() > threshold:
            return generation
    return None


@pytest.mark.parametrize(
    ("algorithm_cls", "lb", "ub", "optimum"),
    [
        (BoundedCMAES, -1.0, 1.0, None),
        (BoundedPSO, -1.0, 1.0, None),
        (BoundedCMAES, 0.0, 1.0, torch.linspace(0.2, 0.8, 10)),
        # Upstream PSO clamps velocity to [lb, ub]: with lb = 0 its swarm can only move up and freezes.
        (BoundedPSO, 0.0, 1.0, torch.linspace(0.2, 0.8, 10)),
    ],
    ids=["cmaes", "pso", "cmaes_lb0", "pso_lb0"],
)
def test_wrappers_drive_a_10d_sphere_below_1e_8_within_300_generations(algorithm_cls, lb, ub, optimum):
    sphere = SmoothLandscape(10, seed=4, condition_number=1.0, optimum=optimum)
    algorithm = algorithm_cls(10, pop_size=50, lb=lb, ub=ub, seed=0)
    assert _steps_to_reach(algorithm, sphere, threshold=-1e-8, max_generations=300) is not None


def test_upstream_pso_velocity_cannot_go_negative_when_lb_is_zero():
    # The bug the wrapper fixes (docs/evox.md); if this starts failing, upstream fixed it.
    torch.manual_seed(0)
    upstream = PSO(20, torch.zeros(4), torch.ones(4))
    sphere = SmoothLandscape(4, condition_number=1.0, optimum=torch.full((4,), 0.5))
    workflow = StdWorkflow(upstream, sphere, opt_direction="max")
    workflow.init_step()
    for _ in range(5):
        workflow.step()
    assert workflow.algorithm.velocity.min() >= 0
    ours = BoundedPSO(4, lb=0.0, ub=1.0, seed=0)
    workflow = StdWorkflow(ours, sphere, opt_direction="max")
    workflow.init_step()
    workflow.step()
    assert workflow.algorithm.velocity.min() < 0


def test_cmaes_rank_one_update_is_the_outer_product_of_the_evolution_path():
    cmaes = BoundedCMAES(3, pop_size=6, seed=0)
    C = torch.eye(3)
    p_c = torch.tensor([1.0, -2.0, 0.5])
    selected = cmaes.mean.expand(cmaes.mu, 3).clone()  # zero rank-mu term
    h_sigma = torch.tensor(1.0)
    updated = cmaes._update_covariance_matrix(C, p_c, selected, cmaes.mean, h_sigma)
    expected = (1 - cmaes.c_1 - cmaes.c_mu) * C + cmaes.c_1 * torch.outer(p_c, p_c)
    torch.testing.assert_close(updated, expected)


def test_cmaes_starts_at_the_uniform_average_with_a_quarter_box_step():
    cmaes = BoundedCMAES(8, lb=-1.0, ub=1.0)
    torch.testing.assert_close(cmaes.mean, torch.full((1, 8), 1 / 8))
    assert cmaes.sigma.item() == pytest.approx(0.5)


@pytest.mark.parametrize("boundary", ["clip", "reflect"])
def test_cmaes_only_evaluates_points_inside_the_box(boundary):
    outside = SmoothLandscape(5, condition_number=1.0, optimum=torch.full((5,), 1.5))
    problem = Recording(outside)
    cmaes = BoundedCMAES(5, pop_size=12, lb=-1.0, ub=1.0, seed=1, boundary=boundary)  # the optimum lies outside
    workflow = StdWorkflow(cmaes, problem, opt_direction="max")
    workflow.init_step()
    for _ in range(60):
        workflow.step()
    seen = torch.cat(problem.populations)
    assert seen.min() >= -1 and seen.max() <= 1
    best = outside.evaluate(seen).max().item()
    assert best > -5 * 0.5**2 - 0.05, "converges towards the corner nearest the outside optimum"


def test_repair_clips_or_reflects_into_the_box():
    lb, ub = torch.tensor([0.0, -1.0]), torch.tensor([1.0, 1.0])
    x = torch.tensor([[1.25, -1.5], [-0.25, 3.5], [0.5, 0.0]])
    torch.testing.assert_close(repair(x, lb, ub, "clip"), torch.tensor([[1.0, -1.0], [0.0, 1.0], [0.5, 0.0]]))
    torch.testing.assert_close(repair(x, lb, ub, "reflect"), torch.tensor([[0.75, -0.5], [0.25, -0.5], [0.5, 0.0]]))


@pytest.mark.parametrize("algorithm_cls", [EvoGM, BoundedCMAES, BoundedPSO, RandomSearch])
def test_every_algorithm_takes_the_same_basic_arguments_and_stays_in_bounds(algorithm_cls):
    kwargs = {"hidden_sizes": (8,), "train_steps": 2} if algorithm_cls is EvoGM else {}
    algorithm = algorithm_cls(num_experts=4, pop_size=6, lb=-0.5, ub=0.5, seed=3, **kwargs)
    problem = Recording(SmoothLandscape(4, seed=0))
    workflow = StdWorkflow(algorithm, problem, opt_direction="max")
    workflow.init_step()
    for _ in range(4):
        workflow.step()
    assert [len(pop) for pop in problem.populations] == [6] * 5, "one generation of pop_size evaluations per step"
    seen = torch.cat(problem.populations)  # EvoGM's too, after its basis shift (evogm_basis.RoundBasis.repair)
    assert seen.min() >= -0.5 and seen.max() <= 0.5


def test_pso_starts_from_evogm_hybrid_population():
    pso = BoundedPSO(4, pop_size=8, seed=0)
    torch.testing.assert_close(pso.pop[0], torch.full((4,), 0.25))
    torch.testing.assert_close(pso.pop[1:5], torch.eye(4))


@pytest.mark.parametrize("algorithm_cls", [BoundedCMAES, BoundedPSO, RandomSearch])
def test_a_seed_fixes_the_run_even_when_the_problem_uses_the_global_rng(algorithm_cls):
    class NoisyGlobal(Problem):
        def evaluate(self, pop):
            torch.rand(7)  # shifts the global stream between generations
            return -(pop**2).sum(-1)

    def run(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        problem = Recording(NoisyGlobal())
        workflow = StdWorkflow(algorithm_cls(5, pop_size=8, seed=seed), problem, opt_direction="max")
        workflow.init_step()
        for _ in range(5):
            workflow.step()
        return torch.cat(problem.populations)

    torch.testing.assert_close(run(seed=1, global_seed=0), run(seed=1, global_seed=99), rtol=0, atol=0)
    assert not torch.equal(run(seed=1, global_seed=0), run(seed=2, global_seed=0))


class HalfNaN(Problem):
    """A sphere that returns NaN wherever the first coefficient is positive (a region where merges diverge)."""

    def evaluate(self, pop: torch.Tensor) -> torch.Tensor:
        return torch.where(pop[:, 0] > 0, torch.nan, -(pop**2).sum(-1))


@pytest.mark.parametrize(
    ("algorithm_cls", "best_fitness"),
    [
        (BoundedPSO, lambda algorithm: algorithm.global_best_fit),
        (RandomSearch, lambda algorithm: algorithm.best_fitness),
    ],
    ids=["pso", "random_search"],
)
def test_nan_fitness_never_becomes_the_best(algorithm_cls, best_fitness):
    workflow = StdWorkflow(algorithm_cls(4, pop_size=10, seed=0), HalfNaN(), opt_direction="max")
    workflow.init_step()
    for _ in range(10):
        workflow.step()
    assert torch.isfinite(best_fitness(workflow.algorithm))


def test_cmaes_ranks_nan_last_and_its_mean_leaves_the_nan_region():
    workflow = StdWorkflow(BoundedCMAES(4, pop_size=10, seed=0), HalfNaN(), opt_direction="max")
    workflow.init_step()
    for _ in range(30):
        workflow.step()
    mean = workflow.algorithm.mean[0]
    assert torch.isfinite(mean).all() and torch.isfinite(workflow.algorithm.C).all()
    assert mean[0] <= 0.05


@pytest.mark.parametrize("starts", [False, True], ids=["default_start", "static_start"])
@pytest.mark.parametrize("algorithm_cls", [BoundedCMAES, BoundedPSO, RandomSearch])
def test_state_dict_resumes_a_run_exactly(algorithm_cls, starts, tmp_path):
    initial = torch.tensor([[0.3] * 5, [1.0, 0, 0, 0, 0]]) if starts else None

    def workflow_for() -> tuple[StdWorkflow, Recording]:
        problem = Recording(SmoothLandscape(5, seed=0))
        algorithm = algorithm_cls(5, pop_size=8, seed=2, initial=initial)
        return StdWorkflow(algorithm, problem, opt_direction="max"), problem

    reference, reference_problem = workflow_for()
    reference.init_step()
    for _ in range(6):
        reference.step()

    interrupted, _ = workflow_for()
    interrupted.init_step()
    for _ in range(3):
        interrupted.step()
    torch.save(interrupted.state_dict(), tmp_path / "checkpoint.pt")
    resumed, resumed_problem = workflow_for()
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    for _ in range(3):
        resumed.step()
    torch.testing.assert_close(torch.cat(resumed_problem.populations), torch.cat(reference_problem.populations[4:]))
    if starts:  # evaluated once, in the first generation only (a resumed run does not evaluate them again)
        assert torch.equal(reference_problem.populations[0][:2], initial)
        later = torch.cat(reference_problem.populations[1:])
        assert not any(bool((later == row).all(-1).any()) for row in initial)


def test_plain_evox_de_runs_on_our_landscape_and_improves():
    landscape = SmoothLandscape(6, seed=1)
    torch.manual_seed(0)
    monitor = EvalMonitor(full_fit_history=False)
    de = DE(pop_size=20, lb=-torch.ones(6), ub=torch.ones(6))
    workflow = StdWorkflow(de, landscape, monitor=monitor, opt_direction="max")
    workflow.init_step()
    initial_best = monitor.get_best_fitness().item()
    for _ in range(60):
        workflow.step()
    assert monitor.get_best_fitness().item() > initial_best
    assert monitor.get_best_fitness().item() > -1e-2
