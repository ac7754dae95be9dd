"""The search config: one pydantic model per concept, validated before anything loads.

A config is YAML (or the same as a dict from Python). Unknown keys, missing files and bad values are reported in
one message that names each offending key, e.g. ``algorithm.name: unknown algorithm 'evogn'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from evox_merge.util.errors import MergeInputError, TaskFormatError
from evox_merge.run import registry
from evox_merge.tasks import TaskSpec, load_task_specs, task_spec_from_dict
from evox_merge.util.strict import StrictModel as _Strict
from evox_merge.util.strict import format_validation_errors


class AlgorithmConfig(_Strict):
    """Which algorithm searches, and its constructor arguments.

    ``name`` is a name of `evox_merge.run.registry` (``evogm``, ``cmaes``, ``pso``, ``random`` and EvoGM's
    ablations; ``evox-merge algorithms`` lists them) or an import path to any EvoX Algorithm class
    (``evox.algorithms.DE``). ``pop_size``, ``lb`` and ``ub`` go to every algorithm that takes them; ``params``
    holds the rest (e.g. EvoGM's ``num_rounds``, ``iterations_per_round``, ``winner_ratio``), checked against the
    constructor.
    """

    name: str = "evogm"
    pop_size: int = Field(default=20, ge=1)
    lb: float = -1.0
    ub: float = 1.0
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        try:
            registry.algorithm_class(name)
        except MergeInputError as error:
            raise ValueError(str(error).removeprefix("algorithm.name: ")) from None
        return name

    @field_validator("params")
    @classmethod
    def _accepted(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "name" in info.data:  # else the name already failed
            try:
                registry.check_params(info.data["name"], params)
            except MergeInputError as error:
                raise ValueError(str(error).removeprefix("algorithm.params.")) from None
        return params

    @model_validator(mode="after")
    def _bounds(self) -> "AlgorithmConfig":
        if not self.lb < self.ub:
            raise ValueError(f"lb ({self.lb}) must be below ub ({self.ub})")
        return self


class BudgetConfig(_Strict):
    """How long to search: a number of evaluations (rounded up to whole generations) or of generations.

    The first generation (``init_step``) counts: ``generations: 8`` at population 20 is 160 evaluations.
    """

    evaluations: int | None = Field(default=None, ge=1)
    generations: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_of(self) -> "BudgetConfig":
        if (self.evaluations is None) == (self.generations is None):
            raise ValueError("give exactly one of 'evaluations' or 'generations'")
        return self

    def generations_for(self, pop_size: int) -> int:
        """Whole generations the budget allows at this population size."""
        if self.generations is not None:
            return self.generations
        return -(-self.evaluations // pop_size)


class ReleaseConfig(_Strict):
    """What the release packet holds besides the recipe and the merged LoRA adapter.

    ``baselines``: the static merges (`evox_merge.problems.static_merges.STATIC_MERGES`) compete with the searched
    candidates on the selection part and are reported beside the release.
    """

    full_model: bool = False
    adapter_rank: int | None = Field(default=None, ge=1)
    baselines: bool = True


class SearchConfig(_Strict):
    """Everything one search needs; paths are resolved against the config file's folder.

    Each validation file is split into a search part and a selection part (``selection_fraction`` of its
    examples, shuffled by the task's name: `evox_merge.tasks.split_task`). The search sees only the search part
    (at most ``max_validation_examples`` of it); the release is the best of the search's ``selection_top_k``
    candidates and the static merges on the selection part (`evox_merge.run.selection`). ``normalise`` puts every
    task on one scale before the weighted mean (`evox_merge.problems.normalisation`).
    """

    base: str
    experts: list[str] = Field(min_length=2)
    tokenizer: str | None = None
    tasks: list[dict[str, Any]] | str
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    budget: BudgetConfig = Field(default_factory=lambda: BudgetConfig(evaluations=160))
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(default=32, ge=1)
    max_validation_examples: int | None = Field(default=None, ge=1)
    selection_fraction: float = Field(default=0.3, ge=0.0, lt=1.0)
    selection_top_k: int = Field(default=5, ge=1)
    normalise: Literal["base_best_single", "none"] = "base_best_single"
    output_dir: str = "runs/search"
    intended_use: str = "Not stated in the search config."
    release: ReleaseConfig = Field(default_factory=ReleaseConfig)
    distributed: bool = False
    collective_timeout_s: float = Field(default=600.0, gt=0)

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        import torch

        try:
            torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"not a torch device: {error}") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
        return device

    def task_specs(self, base_dir: str | Path = ".") -> list[TaskSpec]:
        """The task specs (read from the spec file when ``tasks`` is a path)."""
        if isinstance(self.tasks, str):
            return load_task_specs(Path(base_dir, self.tasks))
        return [task_spec_from_dict(item, base_dir, f"tasks[{i}]") for i, item in enumerate(self.tasks)]


def resolve_paths(config: SearchConfig, base_dir: str | Path) -> SearchConfig:
    """Make the config's file paths absolute against `base_dir` and check that they exist."""
    base_dir = Path(base_dir)

    def resolve(value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base_dir / path).resolve())

    problems = []
    base = resolve(config.base)
    if not Path(base).exists():
        problems.append(f"base: {base} does not exist")
    experts = [resolve(expert) for expert in config.experts]
    problems += [f"experts[{i}]: {path} does not exist" for i, path in enumerate(experts) if not Path(path).exists()]
    updates: dict[str, Any] = {"base": base, "experts": experts, "output_dir": resolve(config.output_dir)}
    if config.tokenizer is not None:
        updates["tokenizer"] = resolve(config.tokenizer)
    if isinstance(config.tasks, str):
        updates["tasks"] = resolve(config.tasks)
    try:
        specs = config.model_copy(update=updates).task_specs(base_dir)
        for spec in specs:
            for key, path in (("path", spec.path), ("test_path", spec.test_path)):
                if path is not None and not Path(path).is_file():
                    problems.append(f"tasks.{spec.name}.{key}: {path} does not exist")
    except TaskFormatError as error:
        problems.append(f"tasks: {error}")
        specs = []
    if problems:
        raise MergeInputError("invalid search config: " + "; ".join(problems))
    updates["tasks"] = [spec.to_dict() for spec in specs]
    return config.model_copy(update=updates)


def load_config(source: str | Path | dict[str, Any]) -> SearchConfig:
    """Read and validate a search config from a YAML file or a dict; paths are made absolute and checked.

    Raises:
        MergeInputError: one message naming every bad key (unknown keys, bad values, missing files).
    """
    if isinstance(source, dict):
        data, base_dir = source, Path.cwd()
    else:
        path = Path(source)
        if not path.is_file():
            raise MergeInputError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise MergeInputError(f"{path}: not valid YAML: {error}") from error
        base_dir = path.parent
    if not isinstance(data, dict):
        raise MergeInputError("a search config must be a mapping of keys to values")
    try:
        config = SearchConfig.model_validate(data)
    except ValidationError as error:
        raise MergeInputError(f"invalid search config: {format_validation_errors(error)}") from None
    return resolve_paths(config, base_dir)
