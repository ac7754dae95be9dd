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
from evox_merge.experts.spaces import SearchSpace, build_space
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.normalisation import TaskNormalisation, anchor_normalisation
from evox_merge.problems.static_names import LINEAR_STATIC_MERGES, RANDOM_STATIC_MERGES
from evox_merge.run.loop import search
from evox_merge.run.registry import build_algorithm, is_evogm, racing_for, start_points, takes_starting_points
from evox_merge.run.selection import searched_candidates, select_release, static_candidates
from evox_merge.tasks import read_task, split_task
from evox_merge.util.errors import MergeInputError
from evox_merge.util.machine import host_description


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
                    seeds = config.seeds if method in RANDOM_STATIC_MERGES else config.seeds[:1]
                    cells += [Cell(setting, tasks, method, seed, "paper") for seed in seeds]
                    continue
                for budget in config.budgets:
                    large = setting in config.large_budget_settings and method in large_methods
                    if budget == "paper" or large:
                        cells += [Cell(setting, tasks, method, seed, budget) for seed in config.seeds]
    return cells


def build_search_algorithm(
    method: str, num_experts: int, budget: BudgetSpec, seed: int, evogm_params: dict | None = None,
    space: SearchSpace | None = None, initial: torch.Tensor | None = None,
) -> tuple[Algorithm, int]:
    """The registry's algorithm for a search method, and how many generations the budget gives every method.

    The population is ``pop_per_expert * num_experts`` whatever the search space, so every space gets the same
    evaluations; `space`: the problem's search space (default one coefficient per expert), where the search starts
    from the same merges as in the expert space (`build_algorithm`). EvoGM and its variants get the budget's rounds
    and iterations (plus ``evogm_params``). `initial`: the starting points of ``start: static`` (`static_start`)."""
    params = {**(evogm_params or {}), "num_rounds": budget.rounds, "iterations_per_round": budget.iterations} if (
        is_evogm(method)) else {}
    algorithm = build_algorithm(method, space.dim if space is not None else num_experts,
                                pop_size=budget.pop_per_expert * num_experts, seed=seed, params=params, space=space,
                                initial=initial)
    return algorithm, budget.generations


def static_start(method: str, start: str, problem: MergeProblem, seed: int) -> tuple[torch.Tensor | None, list[str],
                                                                                  list]:
    """The starting points of a search cell, as the product's ``algorithm.start`` gives them
    (`evox_merge.run.search`): with ``static`` and a method that takes starting points, the linear static merges
    (`LINEAR_STATIC_MERGES`: the only ones `start_points` keeps of the product's contest) tuned on `problem` (the
    search part) with `seed`, as `start_points` (best first), their names, and the tuned merges (`Candidate`s);
    else ``(None, [], [])``."""
    if start != "static" or not takes_starting_points(method):
        return None, [], []
    statics = static_candidates(problem, list(LINEAR_STATIC_MERGES), seed=seed)
    return *start_points(statics, problem.space), statics


@lru_cache(maxsize=2)
def _cached_setup(setup_json: str) -> BenchSetup:
    """The setup, loaded once per worker process."""
    return load_setup(SetupConfig.model_validate_json(setup_json))


def _problems(setup: BenchSetup, config: SweepConfig, names: tuple[str, ...], seed: int = 0):
    """Search part, selection part (None without one) and test problems of a task group in the config's search
    space, sharing one normalisation anchored on the search part (measured once per worker process and task
    group; the anchors are the same merges in every space)."""
    parts = [split_task(read_task(setup.specs[name]), config.selection_fraction, config.max_validation_examples)
             for name in names]
    space = build_space(setup.experts.target_names, setup.experts.expert_names, **config.space.options(seed))
    batch = {"batch_size": config.batch_size, "space": space}
    search_problem = MergeProblem(setup.experts, [search for search, _ in parts], **batch)
    selection = None
    if config.selection_fraction > 0:
        selection = MergeProblem(setup.experts, [sel for _, sel in parts], **batch)
    test = MergeProblem(setup.experts, [read_task(setup.specs[name].with_split("test")) for name in names], **batch)
    if config.normalise != "none":
        if names not in _NORMALISATIONS:
            _NORMALISATIONS[names] = anchor_normalisation(search_problem)
        for problem in (search_problem, selection, test):
            if problem is not None:
                problem.normalise(_NORMALISATIONS[names])
    return search_problem, selection, test


_NORMALISATIONS: dict[tuple[str, ...], TaskNormalisation] = {}


def _examples_fraction(records: list[dict], total: int) -> float:
    """The share of the search part's examples the run's candidates were scored on (below 1 only with racing)."""
    return sum(r.get("examples_scored", total) for r in records) / (len(records) * total)


def run_cell(cell: Cell, config: SweepConfig) -> dict[str, Any]:
    """Run one cell and return its row.

    A static merge is tuned on the search part. A search runs on the search part; its pick is the best of its
    ``selection_top_k`` candidates on the selection part (the algorithm alone; the report adds the product, the
    pick against the static merges). Rows hold ``validation`` (search-part fitness), ``selection`` (selection-part
    fitness of the pick), ``test`` (raw weighted mean of test scores) and ``test_normalised``.
    """
    torch.set_num_threads(1)
    started = time.perf_counter()
    setup = _cached_setup(config.setup.model_dump_json())
    search_problem, selection, test = _problems(setup, config, cell.tasks, cell.seed)
    torch.manual_seed(cell.seed)
    row: dict[str, Any] = asdict(cell)
    if cell.method in STATIC_METHODS:
        candidate = static_candidates(search_problem, [cell.method], seed=cell.seed)[0]
        select_release([candidate], selection)
        row.update(validation=candidate.search_fitness, evaluations=None, curve=None, evaluation_seconds=None,
                   settings=candidate.merge.settings)
    else:
        initial, starts, _ = static_start(cell.method, config.start, search_problem, cell.seed)
        algorithm, generations = build_search_algorithm(cell.method, setup.experts.num_experts,
                                                        config.budgets[cell.budget], cell.seed, config.evogm_params,
                                                        space=search_problem.space, initial=initial)
        row.update(start=config.start if initial is not None else "default", starting_points=starts)
        if config.racing is not None:
            search_problem.race(*racing_for(algorithm, config.racing.confidence, config.racing.stages,
                                            config.selection_top_k))
        search_started = time.perf_counter()
        monitor = search(algorithm, search_problem, generations)
        search_seconds = time.perf_counter() - search_started
        space = None if search_problem.space.kind == "expert" else search_problem.space
        candidate = select_release(searched_candidates(monitor.records, config.selection_top_k, space), selection)
        curve = monitor.best_so_far()
        row.update(validation=curve[-1], evaluations=len(curve), curve=curve, search_seconds=search_seconds,
                   evaluation_seconds=monitor.evaluation_seconds,
                   algorithm_seconds=search_seconds - monitor.evaluation_seconds,
                   coefficients=candidate.merge.coefficients.tolist(), pick=candidate.name,
                   examples_fraction=_examples_fraction(monitor.records, search_problem.examples_total))
    test_scores = candidate.merge.score(test)
    row["selection"] = candidate.selection_fitness
    row["test"] = float(test_scores.double() @ test.task_weights)
    row["test_normalised"] = float(test.aggregate(test_scores.unsqueeze(0))[0])
    row["test_tasks"] = dict(zip(test.task_names, test_scores.tolist()))
    row["wall_seconds"] = time.perf_counter() - started
    row["host"] = host_description()
    row["device"] = config.setup.device
    return row
