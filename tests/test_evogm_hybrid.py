"""EvoGM then CMA-ES (`evogm_cmaes`): the switch, starting points, the box, checkpoints, a landscape it solves; and
the sweep's ``start`` key (issue 29, point 3 and the sweep start)."""

import json

import pytest
import torch
from evox.workflows import EvalMonitor, StdWorkflow

from evox_merge.algorithms.cmaes import BoundedCMAES
from evox_merge.algorithms.evogm_hybrid import EvoGMHybrid, elite_distribution
from evox_merge.problems.landscapes import SmoothLandscape
from evox_merge.run.registry import build_algorithm, takes_starting_points
from evox_merge.util.errors import MergeInputError
from tests.recording import Recording

TINY = {"hidden_sizes": (16, 16), "train_steps": 5}


def run(algorithm, problem, generations: int) -> StdWorkflow:
    workflow = StdWorkflow(algorithm, problem, opt_direction="max")
    workflow.init_step()
    for _ in range(generations - 1):
        workflow.step()
    return workflow


def test_registered_by_name_takes_starting_points_and_evaluates_them_first():
    initial = torch.tensor([[0.4] * 6, [1.0, 0, 0, 0, 0, 0], [2.0] * 6])  # the last one outside the box
    algorithm = build_algorithm("evogm_cmaes", 6, pop_size=12, seed=0, params=dict(TINY), initial=initial)
    assert isinstance(algorithm, EvoGMHybrid) and takes_starting_points("evogm_cmaes")
    problem = Recording(SmoothLandscape(6, seed=0))
    run(algorithm, problem, 1)
    torch.testing.assert_close(problem.populations[0][:3], torch.clamp(initial, -0.5, 1.5))


def test_cmaes_takes_over_from_the_best_point_with_the_elites_spread():
    problem = Recording(SmoothLandscape(6, seed=1))
    algorithm = EvoGMHybrid(6, pop_size=12, seed=3, generative_generations=2, **TINY)
    workflow = run(algorithm, problem, 2)
    assert algorithm.phase == "cmaes" and not algorithm.switch
    history = torch.cat(problem.populations)
    best = history[torch.argmax(problem.base.evaluate(history))]
    workflow.step()  # the first CMA-ES generation
    assert algorithm.switch["generation"] == 2 and algorithm.candidate_annotations()["phase"] == "cmaes"
    torch.testing.assert_close(torch.tensor(algorithm.switch["mean"]), best)
    # Its samples spread around that best point at the elites' scale, not CMA-ES's default quarter box.
    third = problem.populations[2]
    assert float((third.mean(0) - best).abs().max()) < 0.5
    assert algorithm.switch["sigma"] < 0.5 * 2.0


def test_elite_distribution_is_the_weighted_elite_covariance_shrunk_to_trace_n():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.1], [5.0, 5.0]])
    fitness = torch.tensor([1.0, 0.0, float("nan"), 2.0])  # minimised: best is row 1, NaN never an elite
    weights = torch.tensor([0.5, 0.5])
    mean, sigma, shape = elite_distribution(points, fitness, weights, -torch.ones(2), torch.ones(2), 0.0)
    assert torch.equal(mean, points[1])
    # elites rows 1 and 0: variance 0.25 on the first coordinate, 0 on the second
    assert sigma == pytest.approx((0.25 / 2) ** 0.5)
    torch.testing.assert_close(shape, torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    _, _, shrunk = elite_distribution(points, fitness, weights, -torch.ones(2), torch.ones(2), 0.2)
    assert float(torch.linalg.eigvalsh(shrunk.double()).min()) > 0.1


@pytest.mark.parametrize("stop_after", [1, 2, 4], ids=["in_evogm", "at_switch", "in_cmaes"])
def test_a_checkpoint_resumes_the_exact_run(stop_after, tmp_path):
    initial = torch.tensor([[0.3] * 5])

    def fresh():
        problem = Recording(SmoothLandscape(5, seed=0))
        algorithm = EvoGMHybrid(5, pop_size=8, seed=2, initial=initial, generative_generations=2, **TINY)
        return StdWorkflow(algorithm, problem, opt_direction="max"), problem

    reference, reference_problem = fresh()
    reference.init_step()
    for _ in range(6):
        reference.step()
    interrupted, _ = fresh()
    interrupted.init_step()
    for _ in range(stop_after - 1):
        interrupted.step()
    torch.save(interrupted.state_dict(), tmp_path / "checkpoint.pt")
    resumed, resumed_problem = fresh()
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    for _ in range(7 - stop_after):
        resumed.step()
    assert torch.equal(torch.cat(resumed_problem.populations), torch.cat(reference_problem.populations[stop_after:]))


def test_every_candidate_lies_in_the_box_when_the_optimum_is_outside():
    problem = Recording(SmoothLandscape(4, seed=0, condition_number=1.0, optimum=torch.tensor([3.0, -2.0, 0.5, 1.0])))
    algorithm = EvoGMHybrid(4, pop_size=8, lb=-0.5, ub=1.5, seed=0, **TINY)
    run(algorithm, problem, 10)
    evaluated = torch.cat(problem.populations)
    assert len(evaluated) == 80 and bool((evaluated >= -0.5).all() and (evaluated <= 1.5).all())
    best = evaluated[torch.argmax(problem.base.evaluate(evaluated))]
    assert float(best[0]) > 1.4 and float(best[1]) < -0.4  # it pushes against the faces the optimum lies beyond


def test_it_solves_a_smooth_landscape_and_refines_past_evogms_phase():
    landscape = SmoothLandscape(6, seed=2, condition_number=10.0)
    monitor = EvalMonitor(full_fit_history=False)
    algorithm = EvoGMHybrid(6, pop_size=12, seed=0, generative_generations=2, **TINY)
    workflow = StdWorkflow(algorithm, landscape, monitor=monitor, opt_direction="max")
    workflow.init_step()
    workflow.step()
    after_evogm = float(monitor.get_best_fitness())
    for _ in range(78):
        workflow.step()
    assert float(monitor.get_best_fitness()) > -1e-5 > after_evogm


def test_a_seed_fixes_the_run_and_a_shorter_run_is_a_prefix_of_a_longer_one():
    def populations(seed: int, generations: int) -> torch.Tensor:
        problem = Recording(SmoothLandscape(5, seed=0))
        run(EvoGMHybrid(5, pop_size=8, seed=seed, **TINY), problem, generations)
        return torch.cat(problem.populations)

    long = populations(1, 6)
    assert torch.equal(populations(1, 3), long[:24])
    assert not torch.equal(populations(2, 6), long)


@pytest.mark.parametrize(("argument", "value"), [("generative_generations", 0), ("shrinkage", 1.5),
                                                  ("pop_size", 1)])
def test_bad_arguments_are_refused_by_name(argument, value):
    with pytest.raises(MergeInputError, match=argument):
        EvoGMHybrid(4, **{argument: value})


def test_the_cmaes_it_hands_over_to_is_the_projects_bounded_cmaes():
    assert isinstance(EvoGMHybrid(4, pop_size=4, **TINY).cmaes, BoundedCMAES)


# --- the sweep's start ----------------------------------------------------------------------------------------------


def test_sweep_cells_start_from_the_static_merges_and_record_it(tiny_setup, tmp_path):
    from test_sweep import sweep_config

    from benchmarks.sweep.config import load_sweep_config
    from benchmarks.sweep.runner import run_sweep

    path = sweep_config(tiny_setup, tmp_path, ["task_arithmetic", "cmaes"], seeds=(0,))
    assert load_sweep_config(path).start == "static"
    run_sweep(path, progress=False, only={"setting": {"multi_task_unseen"}, "budget": {"paper"}})
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    search = [row for row in rows if row["method"] == "cmaes"]
    assert search and all(row["start"] == "static" and "task_arithmetic" in row["starting_points"] for row in search)
    assert "Searches start `static`" in (tmp_path / "out" / "results.md").read_text()


def test_a_sweep_folder_written_before_the_start_key_is_not_resumed_into_mixed_rows(tiny_setup, tmp_path):
    from test_sweep import sweep_config

    from benchmarks.sweep.runner import run_sweep

    path = sweep_config(tiny_setup, tmp_path, ["cmaes"], seeds=(0,))
    out = tmp_path / "out"
    out.mkdir()
    old = {"setting": "multi_task_unseen", "tasks": [], "method": "cmaes", "seed": 5, "budget": "paper"}
    (out / "rows.jsonl").write_text(json.dumps(old) + "\n")  # an old row: no "start", so it started "default"
    with pytest.raises(MergeInputError, match="start: .*rows.jsonl.*'default'"):
        run_sweep(path, progress=False)
    assert (out / "rows.jsonl").read_text() == json.dumps(old) + "\n"  # nothing the user had is touched
