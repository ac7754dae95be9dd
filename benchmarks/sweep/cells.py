"""One sweep cell: a method searching (or a static merge of) one setting's tasks with one seed and budget."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch
from evox.core import Algorithm

from benchmarks.sweep.config import STATIC_METHODS, BudgetSpec, SetupConfig, SweepConfig
from benchmarks.sweep.setup import BenchSetup, load_setup
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.static_merges import tune_static_merge
from evox_merge.run.loop import search
from evox_merge.run.registry import build_algorithm, is_evogm
from evox_merge.tasks import Task, read_task
from evox_merge.util.errors import MergeInputError


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
    """The registry's algorithm for a search method, and how many generations the budget gives every method.

    EvoGM and its variants get the budget's rounds and iterations (plus ``evogm_params``)."""
    params = {**(evogm_params or {}), "num_rounds": budget.rounds, "iterations_per_round": budget.iterations} if (
        is_evogm(method)) else {}
    algorithm = build_algorithm(method, num_experts, pop_size=budget.pop_per_expert * num_experts, seed=seed,
                                params=params)
    return algorithm, budget.generations


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
        merge = tune_static_merge(cell.method, validation, cell.seed)
        test_scores = merge.score(test)
        row.update(validation=merge.fitness, evaluations=None, curve=None, evaluation_seconds=None,
                   settings=merge.settings)
    else:
        algorithm, generations = build_search_algorithm(cell.method, setup.experts.num_experts,
                                                        config.budgets[cell.budget], cell.seed, config.evogm_params)
        search_started = time.perf_counter()
        monitor = search(algorithm, validation, generations)
        search_seconds = time.perf_counter() - search_started
        best = torch.tensor(monitor.best_record()["coefficients"])
        test_scores = test.evaluate_per_task(best.unsqueeze(0))[0]
        curve = monitor.best_so_far()
        row.update(validation=curve[-1], evaluations=len(curve), curve=curve, search_seconds=search_seconds,
                   evaluation_seconds=monitor.evaluation_seconds,
                   algorithm_seconds=search_seconds - monitor.evaluation_seconds, coefficients=best.tolist())
    row["test"] = float(test.aggregate(test_scores.unsqueeze(0))[0])
    row["test_tasks"] = dict(zip(test.task_names, test_scores.tolist()))
    row["wall_seconds"] = time.perf_counter() - started
    return row
