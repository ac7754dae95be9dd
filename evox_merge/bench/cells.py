"""One sweep cell: a method searching (or a static merge of) one setting's tasks with one seed and budget."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch
from evox.core import Algorithm, Monitor

from evox_merge import baselines
from evox_merge.algorithms import BoundedCMAES, BoundedPSO, EvoGM, RandomSearch
from evox_merge.bench.config import STATIC_METHODS, BudgetSpec, SetupConfig, SweepConfig
from evox_merge.bench.setup import BenchSetup, load_setup
from evox_merge.errors import MergeInputError
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.tasks import Task, read_task
from evox_merge.workflow import build_workflow


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    setting: str
    tasks: tuple[str, ...]
    method: str
    seed: int
    budget: str

    @property
    def key(self) -> str:
        """Unique id, used to skip finished cells on resume."""
        return f"{self.setting}|{'+'.join(self.tasks)}|{self.method}|{self.seed}|{self.budget}"


def grid(config: SweepConfig, setup: BenchSetup) -> list[Cell]:
    """Every cell of the sweep: static merges once (DARE once per seed), searches per seed and budget."""
    single = config.single_task_tasks if config.single_task_tasks is not None else setup.unseen
    unknown = sorted(set(single) - set(setup.unseen))
    if unknown:
        raise MergeInputError(f"single_task_tasks: {unknown} are not unseen tasks of the setup; "
                              f"unseen tasks: {setup.unseen}")
    task_groups = {
        "single_task_unseen": [(name,) for name in single],
        "multi_task_unseen": [tuple(setup.unseen)],
        "multi_task_seen": [tuple(setup.seen)],
    }
    large_methods = config.large_budget_methods if config.large_budget_methods is not None else config.methods
    cells = []
    for setting in config.settings:
        for tasks in task_groups[setting]:
            for method in config.methods:
                if method in STATIC_METHODS:
                    seeds = config.seeds if method == "dare" else config.seeds[:1]
                    cells += [Cell(setting, tasks, method, seed, "paper") for seed in seeds]
                    continue
                for budget in config.budgets:
                    large = setting in config.large_budget_settings and method in large_methods
                    if budget == "paper" or large:
                        cells += [Cell(setting, tasks, method, seed, budget) for seed in config.seeds]
    return cells


def build_search_algorithm(
    method: str, num_experts: int, budget: BudgetSpec, seed: int, evogm_params: dict | None = None
) -> tuple[Algorithm, int]:
    """The algorithm for a search method and how many generations the budget gives every method."""
    pop_size = budget.pop_per_expert * num_experts
    generations = budget.generations
    common = {"pop_size": pop_size, "seed": seed}
    evogm = {**(evogm_params or {}), "num_rounds": budget.rounds, "iterations_per_round": budget.iterations, **common}
    algorithms = {
        "random": lambda: RandomSearch(num_experts, **common),
        "cmaes": lambda: BoundedCMAES(num_experts, **common),
        "pso": lambda: BoundedPSO(num_experts, **common),
        "evogm": lambda: EvoGM(num_experts, **evogm),
        "evogm_single_generator": lambda: EvoGM(num_experts, single_generator=True, **evogm),
        "evogm_no_rounds": lambda: EvoGM(num_experts, multi_round=False, **evogm),
        "evogm_no_cycle": lambda: EvoGM(num_experts, cycle_weight=0.0, **evogm),
    }
    return algorithms[method](), generations


class CurveMonitor(Monitor):
    """Keeps every candidate's coefficients and fitness, and the seconds spent inside evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.coefficients: list[torch.Tensor] = []
        self.fitness: list[float] = []
        self.evaluation_seconds = 0.0
        self._started = 0.0

    def post_ask(self, candidate_solution: torch.Tensor) -> None:
        self.coefficients.append(candidate_solution.detach().cpu())
        self._started = time.perf_counter()

    def post_eval(self, fitness: torch.Tensor) -> None:
        self.evaluation_seconds += time.perf_counter() - self._started
        self.fitness += fitness.detach().cpu().double().tolist()

    def best_so_far(self) -> list[float]:
        """Best validation fitness after each evaluation."""
        curve, best = [], -math.inf
        for value in self.fitness:
            best = max(best, value) if math.isfinite(value) else best
            curve.append(best)
        return curve

    def best_coefficients(self) -> torch.Tensor:
        finite = [v if math.isfinite(v) else -math.inf for v in self.fitness]
        return torch.cat(self.coefficients)[max(range(len(finite)), key=finite.__getitem__)]


@lru_cache(maxsize=2)
def _cached_setup(setup_json: str) -> BenchSetup:
    """The setup, loaded once per worker process."""
    return load_setup(SetupConfig.model_validate_json(setup_json))


def _tasks(setup: BenchSetup, names: tuple[str, ...], split: str, limit: int | None) -> list[Task]:
    return [read_task(setup.specs[name].with_split(split), limit if split == "validation" else None)
            for name in names]


def run_cell(cell: Cell, config: SweepConfig) -> dict[str, Any]:
    """Run one cell and return its row: validation and test score of its choice, curve, cost."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    setup = _cached_setup(config.setup.model_dump_json())
    validation = MergeProblem(setup.experts, _tasks(setup, cell.tasks, "validation", config.max_validation_examples),
                              batch_size=config.batch_size)
    test = MergeProblem(setup.experts, _tasks(setup, cell.tasks, "test", None), batch_size=config.batch_size)
    torch.manual_seed(cell.seed)
    row: dict[str, Any] = asdict(cell)
    if cell.method in STATIC_METHODS:
        merge = _static_merge(cell.method, validation, cell.seed)
        test_scores = merge.score(test)
        row.update(validation=merge.fitness, evaluations=None, curve=None, evaluation_seconds=None,
                   settings=merge.settings)
    else:
        algorithm, generations = build_search_algorithm(cell.method, setup.experts.num_experts,
                                                        config.budgets[cell.budget], cell.seed, config.evogm_params)
        monitor = CurveMonitor()
        workflow = build_workflow(algorithm, validation, monitor)
        search_started = time.perf_counter()
        workflow.init_step()
        for _ in range(generations - 1):
            workflow.step()
        search_seconds = time.perf_counter() - search_started
        best = monitor.best_coefficients()
        test_scores = test.evaluate_per_task(best.unsqueeze(0))[0]
        curve = monitor.best_so_far()
        row.update(validation=curve[-1], evaluations=len(curve), curve=curve, search_seconds=search_seconds,
                   evaluation_seconds=monitor.evaluation_seconds,
                   algorithm_seconds=search_seconds - monitor.evaluation_seconds, coefficients=best.tolist())
    row["test"] = float(test.aggregate(test_scores.unsqueeze(0))[0])
    row["test_tasks"] = dict(zip(test.task_names, test_scores.tolist()))
    row["wall_seconds"] = time.perf_counter() - started
    return row


def _static_merge(method: str, problem: MergeProblem, seed: int) -> baselines.StaticMerge:
    if method == "base":
        return baselines.base_model(problem)
    if method == "best_single":
        return baselines.best_single_expert(problem)
    if method == "model_soup":
        return baselines.model_soup(problem)
    if method == "task_arithmetic":
        return baselines.task_arithmetic(problem)
    if method == "ties":
        return baselines.dense_merge(problem, "ties", density=0.2)
    return baselines.dense_merge(problem, "dare_ties", density=0.5, seed=seed)
