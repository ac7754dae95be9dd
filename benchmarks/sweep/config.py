"""The sweep config: which merging setup, settings, methods, seeds and budgets a benchmark sweep runs.

Reading and checking a sweep config (`load_sweep_config`, `override_device`, `parse_only`) imports neither torch nor
EvoX, so `evox-merge bench` refuses a bad config, setup or option in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from evox_merge.algorithms.limits import DEFAULT_START, STARTS
from evox_merge.problems.static_names import STATIC_MERGE_NAMES
from evox_merge.run.config import RacingConfig, SpaceConfig, check_algorithm_params, check_device, seed_problem
from evox_merge.run.registry import algorithm_names, argument_problems, is_multi_objective
from evox_merge.util.errors import MergeInputError
from evox_merge.util.strict import StrictModel as _Strict
from evox_merge.util.yaml_file import read_yaml
from evox_merge.util.strict import format_validation_errors

SETTINGS = ("single_task_unseen", "multi_task_unseen", "multi_task_seen")
STATIC_METHODS = STATIC_MERGE_NAMES  # every static merge the library knows
SEARCH_METHODS = tuple(name for name in algorithm_names() if not is_multi_objective(name))  # scalar searches


class SetupConfig(_Strict):
    """Where the base, experts and tasks come from: the offline zoo (``zoo_preset``) or explicit paths."""

    zoo_preset: str | None = "tiny"
    zoo_seed: int = 0
    zoo_dir: str | None = None
    base: str | None = None
    experts: list[str] | None = None
    seen_tasks: str | None = None
    unseen_tasks: str | None = None
    device: str = "cpu"  # where the model, its factors and the scoring run (the algorithms stay on the CPU)

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        return check_device(device)

    @model_validator(mode="after")
    def _one_source(self) -> "SetupConfig":
        explicit = [self.base, self.experts, self.seen_tasks, self.unseen_tasks]
        if any(value is not None for value in explicit):
            if any(value is None for value in explicit):
                raise ValueError("explicit setups need all of base, experts, seen_tasks and unseen_tasks")
        return self


class BudgetSpec(_Strict):
    """A budget relative to the paper's: P = pop_per_expert * N, EvoGM's R rounds of T iterations, and
    (R * (T + 1)) generations of P evaluations for every search method."""

    pop_per_expert: int = Field(default=2, ge=1)
    rounds: int = Field(default=2, ge=1)
    iterations: int = Field(default=3, ge=1)

    @property
    def generations(self) -> int:
        """Generations every search method gets: EvoGM's R rounds of 1 initial + T generated populations."""
        return self.rounds * (self.iterations + 1)


class SweepConfig(_Strict):
    """A grid of settings x methods x seeds x budgets, all searches of a budget getting the same evaluations.

    ``evogm_params`` go to EvoGM and its ablations (e.g. ``train_steps``); the budget fixes P, R and T.
    Validation files are split as in a search run (``selection_fraction``, the search part capped at
    ``max_validation_examples``, ``normalise``: `evox_merge.run.config.SearchConfig`); the report's product rows
    pit each search's pick against those of ``product_statics`` that are in ``methods``, on the selection part.
    Budgets other than ``paper`` run in ``large_budget_settings`` for ``large_budget_methods`` (default: every
    search method); ``single_task_unseen`` searches each of ``single_task_tasks`` (default: every unseen task).
    ``start`` is every search's start, as the search config's ``algorithm.start`` (`evox_merge.algorithms.limits`):
    ``static`` (the default, as the product's) starts each search from the static merges tuned on its search part,
    ``default`` from the algorithm's own start. Rows record it; rows written before the key existed ran ``default``.
    """

    setup: SetupConfig = Field(default_factory=SetupConfig)
    settings: list[Literal["single_task_unseen", "multi_task_unseen", "multi_task_seen"]] = list(SETTINGS)
    methods: list[str] = Field(default_factory=lambda: [*STATIC_METHODS, *SEARCH_METHODS])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1)
    budgets: dict[str, BudgetSpec] = Field(default_factory=lambda: {"paper": BudgetSpec()})
    large_budget_settings: list[str] = Field(default_factory=lambda: ["multi_task_unseen"])
    large_budget_methods: list[str] | None = None
    single_task_tasks: list[str] | None = None
    evogm_params: dict = Field(default_factory=dict)
    start: Literal[STARTS] = DEFAULT_START  # type: ignore[valid-type]
    max_validation_examples: int | None = Field(default=None, ge=1)
    selection_fraction: float = Field(default=0.3, ge=0.0, lt=1.0)
    selection_top_k: int = Field(default=5, ge=1)
    normalise: Literal["base_best_single", "none"] = "base_best_single"
    product_statics: list[str] = Field(default_factory=lambda: ["task_arithmetic", "ties", "model_soup", "best_single"])
    batch_size: int = Field(default=64, ge=1)
    workers: int = Field(default=2, ge=1)
    racing: RacingConfig | None = None  # opt-in racing for every search (`evox_merge.problems.racing`)
    space: SpaceConfig = Field(default_factory=SpaceConfig)  # the search space of every search
    output_dir: str = "benchmarks/results/sweep"

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        for seed in seeds:
            problem = seed_problem(seed)
            if problem:
                raise ValueError(problem)
        return seeds

    @model_validator(mode="after")
    def _known_methods(self) -> "SweepConfig":
        unknown = sorted(set(self.methods) - set(STATIC_METHODS) - set(SEARCH_METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {[*STATIC_METHODS, *SEARCH_METHODS]}")
        misplaced = sorted(set(self.large_budget_methods or []) - set(SEARCH_METHODS))
        if misplaced:
            raise ValueError(f"large_budget_methods must be search methods {list(SEARCH_METHODS)}; got {misplaced}")
        if "paper" not in self.budgets:
            raise ValueError("budgets must define 'paper' (the budget every setting runs)")
        try:  # EvoGM's own arguments, by the rules a search config is checked with (no import)
            check_algorithm_params("evogm", self.evogm_params)
        except MergeInputError as error:
            raise ValueError(str(error).replace("algorithm.params.", "evogm_params.")) from None
        problems = argument_problems("evogm", 2, self.evogm_params)
        if problems:
            raise ValueError("; ".join(problems).replace("algorithm.params.", "evogm_params."))
        return self


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep config (YAML); relative paths are resolved against its folder."""
    path = Path(path)
    if not path.is_file():
        raise MergeInputError(f"sweep config {path} does not exist")
    data = read_yaml(path, MergeInputError) or {}
    try:
        config = SweepConfig.model_validate(data)
    except ValidationError as error:
        raise MergeInputError(f"invalid sweep config {path}: {format_validation_errors(error)}") from None
    setup = config.setup
    if setup.base is not None:
        resolve = lambda value: str((path.parent / value).resolve())  # noqa: E731
        setup = setup.model_copy(update={
            "base": resolve(setup.base), "experts": [resolve(e) for e in setup.experts],
            "seen_tasks": resolve(setup.seen_tasks), "unseen_tasks": resolve(setup.unseen_tasks),
        })
    _check_setup(setup, path)
    return config.model_copy(update={"setup": setup, "output_dir": str(Path(config.output_dir))})


def _check_setup(setup: SetupConfig, path: Path) -> None:
    """What the files say about a setup, before anything loads: an explicit setup's folders and task spec files
    exist and read; a zoo setup's preset, seed and directory can be used (`check_zoo_arguments`)."""
    from evox_merge.run.zoo_search import check_zoo_arguments
    from evox_merge.tasks import load_task_specs
    from evox_merge.util.errors import TaskFormatError, ZooError

    if setup.base is None:
        try:
            check_zoo_arguments(setup.zoo_dir, setup.zoo_preset, setup.zoo_seed,
                                ("setup.zoo_preset", "setup.zoo_dir", "setup.zoo_seed"))
        except (MergeInputError, ZooError) as error:
            raise MergeInputError(f"invalid sweep config {path}: {error}") from None
        return
    for key, folder in [("base", setup.base), *((f"experts[{i}]", e) for i, e in enumerate(setup.experts))]:
        if not Path(folder).is_dir():
            raise MergeInputError(f"invalid sweep config {path}: setup.{key}: {folder} is not a directory")
    for key in ("seen_tasks", "unseen_tasks"):
        try:
            load_task_specs(getattr(setup, key))
        except TaskFormatError as error:
            raise MergeInputError(f"invalid sweep config {path}: setup.{key}: {error}") from None


def override_device(config: SweepConfig, device: str | None) -> SweepConfig:
    """`config` with ``setup.device`` replaced by `device` (``bench --device``), checked; `config` when None."""
    if device is None:
        return config
    try:
        setup = SetupConfig.model_validate({**config.setup.model_dump(), "device": device})
    except ValidationError as error:
        raise MergeInputError(f"--device {device}: {format_validation_errors(error)}") from None
    return config.model_copy(update={"setup": setup})


CELL_FIELDS = ("setting", "method", "seed", "budget")


def parse_only(values: list[str]) -> dict[str, set[str]]:
    """``["setting=multi_task_seen,multi_task_unseen", "budget=large"]`` -> ``{"setting": {...}, "budget": {...}}``."""
    only: dict[str, set[str]] = {}
    for value in values:
        field, _, choices = value.partition("=")
        if field not in CELL_FIELDS or not choices:
            raise ValueError(f"--only {value!r}: expected FIELD=VALUE[,VALUE...] with FIELD one of {CELL_FIELDS}")
        only.setdefault(field, set()).update(choice.strip() for choice in choices.split(","))
    return only
