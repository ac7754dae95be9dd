"""The search config: one pydantic model per concept, validated before anything loads.

A config is YAML (or the same as a dict from Python). Unknown keys, missing files and bad values are reported in
one message that names each offending key, e.g. ``algorithm.name: unknown algorithm 'evogn'``.

`load_config` checks everything that can be known without the model, in this order, and fails on the first stage
that finds a problem: the YAML; every key's type and range (finite bounds, a seed from 0 to 2**64 - 1, a device
evox-merge runs on); then the files and names (base, experts and tokenizer as local folders or Hub ids, the output
directory, every task spec and every line of every task file, each validation file's split into a search and a
selection part, duplicate task names, all-zero weights, the algorithm's params and population). Validating imports
neither torch, transformers nor EvoX: the params of a registered algorithm are checked against its constructor's
signature read from its source file with `ast` (`constructor_parameters`), and its population and param values by
the torch-free rules of `evox_merge.algorithms.limits` (with the search's dimension where the files give it:
`search_dimension`), so a bad config fails in a fraction of a second. Only an algorithm given by import path
(``evox.algorithms.DE``) must be imported to be checked (and is built once, `_build_once`); that happens last, once
everything else has passed, and still before any model loads. Only a CUDA ``device`` imports torch, to count GPUs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from evox_merge.util.errors import MergeInputError, TaskFormatError
from evox_merge.util.layer_names import block_index, lora_layer_names
from evox_merge.run import registry
from evox_merge.run.output_dir import output_dir_problem
from evox_merge.tasks.spec import TaskSpec, check_task_specs, read_task, split_overlap, split_task
from evox_merge.tasks.spec_sources import load_task_specs, task_specs_from_dict
from evox_merge.util.hub import is_dense_expert, is_hub_id, local_path, read_model_config, resolve_model
from evox_merge.util.adapter_files import expert_problems, task_spec_file_problem
from evox_merge.util.yaml_file import read_yaml
from evox_merge.util.strict import StrictModel as _Strict
from evox_merge.util.strict import format_validation_errors
from evox_merge.run.algorithm_params import (check_algorithm, check_algorithm_params, constructor_defaults,
                                             constructor_parameters, defines_racing_quota, search_dimension)
from evox_merge.run.config_sections import (RELEASE_RULES, SUBSAMPLE_ALGORITHMS, AlgorithmConfig, BudgetConfig,
                                            DenseConfig, MergevolveConfig, ObjectivesConfig, RacingConfig,
                                            ReleaseConfig, SpaceConfig, SubsampleConfig, check_device,
                                            check_objectives, objective_folder, objective_names, resolve_dtype,
                                            seed_problem)

__all__ = ["SearchConfig", "load_config", "resolve_paths", "AlgorithmConfig", "BudgetConfig", "DenseConfig",
           "MergevolveConfig", "ObjectivesConfig", "RacingConfig", "ReleaseConfig", "SpaceConfig", "SubsampleConfig",
           "RELEASE_RULES", "SUBSAMPLE_ALGORITHMS", "check_device", "resolve_dtype", "seed_problem",
           "check_objectives", "objective_folder", "objective_names", "constructor_parameters",
           "constructor_defaults", "check_algorithm_params", "defines_racing_quota", "search_dimension"]

logger = logging.getLogger(__name__)

class SearchConfig(_Strict):
    """Everything one search needs; paths are resolved against the config file's folder.

    Each validation file is split into a search part and a selection part (``selection_fraction`` of its
    examples, shuffled by the task's name: `evox_merge.tasks.split_task`). The search sees only the search part
    (at most ``max_validation_examples`` of it); the release is the best of the search's ``selection_top_k``
    candidates and the static merges on the selection part (`evox_merge.run.selection`). ``normalise`` puts every
    task on one scale before the weighted mean (`evox_merge.problems.normalisation`). ``objectives``: ``mean`` (one
    fitness) or ``pareto`` / an `ObjectivesConfig` (a vector of objectives, a Pareto release:
    `evox_merge.run.objectives`). ``dtype: auto`` (the default) is bfloat16 on a CUDA GPU that supports it, else
    float32 (`resolve_dtype`; the validated config holds the dtype used). ``batch_tokens``: batches of at most
    this many padded tokens (rows x length) instead of ``batch_size`` rows (`evox_merge.tasks.batching`).
    """

    base: str
    experts: list[str] = Field(min_length=2)
    tokenizer: str | None = None
    tasks: list[dict[str, Any]] | str
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    budget: BudgetConfig = Field(default_factory=lambda: BudgetConfig(evaluations=160))
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", validate_default=True)
    batch_size: int = Field(default=32, ge=1)
    batch_tokens: int | None = Field(default=None, ge=1)
    max_validation_examples: int | None = Field(default=None, ge=1)
    selection_fraction: float = Field(default=0.3, ge=0.0, lt=1.0)
    selection_top_k: int = Field(default=5, ge=1)
    normalise: Literal["base_best_single", "none"] = "base_best_single"
    objectives: Literal["mean", "pareto"] | ObjectivesConfig = "mean"
    output_dir: str = "runs/search"
    intended_use: str = "Not stated in the search config."
    release: ReleaseConfig = Field(default_factory=ReleaseConfig)
    distributed: bool = False
    collective_timeout_s: float = Field(default=600.0, gt=0)
    racing: RacingConfig | None = None
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    mergevolve: MergevolveConfig | None = None
    dense: DenseConfig = Field(default_factory=DenseConfig)
    subsample: SubsampleConfig | None = None

    @model_validator(mode="after")
    def _subsample(self) -> "SearchConfig":
        refusal = self.subsample.refusal(self) if self.subsample is not None else None
        if refusal:
            raise ValueError(refusal)
        return self

    @model_validator(mode="after")
    def _mergevolve(self) -> "SearchConfig":
        if self.mergevolve is not None and (self.objectives != "mean" or self.distributed):
            raise ValueError("mergevolve: runs after a mean-objective search in one process (not with pareto "
                             "objectives or distributed: true)")
        return self

    @model_validator(mode="after")
    def _racing(self) -> "SearchConfig":
        if self.racing is None:
            return self
        if self.distributed:
            raise ValueError("racing: not with distributed: true (each rank would race its own shard)")
        if self.objectives != "mean":
            raise ValueError("racing: needs objectives: mean (one fitness per candidate to rank by)")
        name = self.algorithm.name
        if name in registry.ALGORITHMS and defines_racing_quota(name) is False:
            raise ValueError(f"racing: algorithm {name!r} does not say which candidates it ranks by (PSO compares "
                             "every particle with its own best and uses every fitness); use evogm, cmaes or random")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        return check_device(device)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, dtype: str, info: ValidationInfo) -> str:
        # ``auto`` becomes the dtype the run will use (`resolve_dtype`), so run.json's config records it.
        device = info.data.get("device")
        return resolve_dtype(dtype, device) if device is not None else dtype

    @field_validator("seed")
    @classmethod
    def _seed(cls, seed: int) -> int:
        problem = seed_problem(seed)
        if problem:
            raise ValueError(problem)
        return seed

    def task_specs(self, base_dir: str | Path = ".") -> list[TaskSpec]:
        """The task specs (read from the spec file when ``tasks`` is a path)."""
        if isinstance(self.tasks, str):
            return load_task_specs(Path(base_dir, self.tasks))
        specs = [spec for i, item in enumerate(self.tasks)
                 for spec in task_specs_from_dict(item, base_dir, f"tasks[{i}]")]
        check_task_specs(specs)
        return specs


def _resolve_model(value: str, what: str, base_dir: Path, problems: list[str], model: bool = False) -> str:
    """An absolute folder for a local reference (a Hub id stays as given, checked to be in the cache); problems
    are appended, not raised, so one message names them all."""
    try:
        source = resolve_model(value, what, base_dir)
        if model:
            read_model_config(source.path, what)
    except MergeInputError as error:
        problems.append(str(error))
        return str(local_path(value, base_dir)) if not is_hub_id(value) else value
    return source.ref


def _build_once(config: SearchConfig, experts: list[str], task_names: list[str]) -> None:
    """Construct an algorithm given by import path as the search will, so that its constructor's own checks refuse
    a bad pop_size or param, and racing one that does not say which candidates it ranks by, before any model loads
    (torch's global RNG left as it was); skipped where the search's dimension needs the model
    (`search_dimension`)."""
    import torch

    algorithm = config.algorithm
    dim = search_dimension(config.space, experts)
    if dim is None:
        return
    kind = config.objectives if isinstance(config.objectives, str) else config.objectives.kind
    groups = None if isinstance(config.objectives, str) else config.objectives.groups
    vector = kind == "pareto" and registry.is_multi_objective(algorithm.name)
    with torch.random.fork_rng(devices=[]):
        built = registry.build_algorithm(algorithm.name, dim, pop_size=algorithm.pop_size, lb=algorithm.lb,
                                         ub=algorithm.ub, seed=config.seed, params=algorithm.params,
                                         n_objs=len(objective_names(groups, task_names)) if vector else None)
    if config.racing is not None:  # it must say which candidates it ranks by
        registry.racing_for(built, config.racing.confidence, config.racing.stages, config.selection_top_k)


def _check_space(space: SpaceConfig, experts: list[str]) -> list[str]:
    """A layer space's groups against the transformer blocks the experts target (from their safetensors headers)."""
    if space.kind != "layer" or (space.by or "blocks") != "blocks":
        return []
    names = {name for expert in experts if Path(expert).is_dir() for name in lora_layer_names(expert)}
    blocks = {block_index(name) for name in names} - {None}
    if names and not blocks:
        return ["space: no target layer name has a block index (e.g. model.layers.3.); use by: module"]
    if blocks and space.groups > len(blocks):
        return [f"space.groups must be an integer from 1 to {len(blocks)} (the transformer blocks the experts "
                f"target), got {space.groups}"]
    return []


def resolve_paths(config: SearchConfig, base_dir: str | Path) -> SearchConfig:
    """Make the config's local paths absolute against `base_dir` and check everything that needs no model: the
    base, experts and tokenizer (folders or cached Hub ids), the output directory, the task specs, every line of
    every task file and each validation file's split, and the algorithm's params and population.

    Raises:
        MergeInputError: naming every offending key (a task file's problems name the file and line).
    """
    base_dir = Path(base_dir).expanduser().absolute()
    problems: list[str] = []
    base = _resolve_model(config.base, "base", base_dir, problems, model=True)
    experts = [_resolve_model(expert, f"experts[{i}]", base_dir, problems) for i, expert in enumerate(config.experts)]
    output_dir = str(local_path(config.output_dir, base_dir))
    updates: dict[str, Any] = {"base": base, "experts": experts, "output_dir": output_dir}
    if config.tokenizer is not None:
        updates["tokenizer"] = _resolve_model(config.tokenizer, "tokenizer", base_dir, problems)
    if isinstance(config.tasks, str):
        updates["tasks"] = str(local_path(config.tasks, base_dir))
    if (problem := output_dir_problem(Path(output_dir))) is not None:
        problems.append(problem)
    specs: list[TaskSpec] = []
    try:
        if isinstance(config.tasks, str) and (found := task_spec_file_problem(Path(updates["tasks"]), "tasks")):
            raise TaskFormatError(found)
        specs = config.model_copy(update=updates).task_specs(base_dir)
    except TaskFormatError as error:
        problems.append(str(error) if str(error).startswith("tasks") else f"tasks: {error}")
    overlaps = []
    for spec in specs:
        before = len(problems)
        for key, path in (("path", spec.path), ("test_path", spec.test_path)):
            if path is None:
                continue
            if not Path(path).is_file():
                what = "is a directory; expected a JSONL file" if Path(path).is_dir() else "does not exist"
                problems.append(f"tasks.{spec.name}.{key}: {path} {what}")
                continue
            try:  # every line, before any model loads
                read_task(spec.with_split("validation" if key == "path" else "test"))
            except TaskFormatError as error:
                problems.append(f"tasks.{spec.name}.{key}: {error}")
        if len(problems) == before:  # both files read: test examples that are validation examples too
            try:
                overlaps.append(split_overlap(spec))
            except TaskFormatError as error:
                problems.append(f"tasks.{spec.name}.test_path: {error}")
        if len(problems) == before:  # the validation file splits into a search part and a selection part
            try:
                split_task(read_task(spec), config.selection_fraction, config.max_validation_examples)
            except TaskFormatError as error:
                problems.append(f"tasks.{spec.name}.path: {error}")
    if specs:
        problems += check_objectives(config.objectives, [spec.name for spec in specs], config.algorithm.name)
    problems += _check_space(config.space, experts)
    problems += expert_problems([(f"experts[{i}]", expert) for i, expert in enumerate(experts)])  # from the files
    dense = [f"experts[{i}]" for i, expert in enumerate(experts) if is_dense_expert(expert)]
    if dense and config.mergevolve is not None:
        problems.append(f"mergevolve: perturbs a LoRA merge's low-rank delta; {', '.join(dense)} are dense "
                        "(fully fine-tuned) experts")
    problems += check_algorithm(config, experts, [spec.name for spec in specs])
    if problems:
        raise MergeInputError("invalid search config: " + "; ".join(problems))
    for overlap in overlaps:
        if overlap is not None:
            logger.warning("%s (recorded in recipe.json and the model card)", overlap["warning"])
    if config.algorithm.name not in registry.ALGORITHMS:  # an import path: imported only now that all else passed
        try:
            registry.check_params(config.algorithm.name, config.algorithm.params)
            _build_once(config, experts, [spec.name for spec in specs])
        except MergeInputError as error:
            raise MergeInputError(f"invalid search config: {error}") from None
    updates["tasks"] = [spec.to_dict() for spec in specs]
    return config.model_copy(update=updates)


def load_config(source: str | Path | dict[str, Any]) -> SearchConfig:
    """Read and validate a search config from a YAML file or a dict; paths are made absolute and checked, task
    files read line by line, algorithm params checked: all before any model loads (see the module docstring).

    Raises:
        MergeInputError: one message naming every bad key (unknown keys, bad values, missing files).
    """
    if isinstance(source, dict):
        data, base_dir = source, Path.cwd()
    else:
        path = Path(source).expanduser().absolute()
        if not path.is_file():
            what = "is a directory; expected a YAML file" if path.is_dir() else "does not exist"
            raise MergeInputError(f"config file {path} {what}")
        data = read_yaml(path, MergeInputError)
        base_dir = path.parent
    if not isinstance(data, dict):
        raise MergeInputError(f"{source if not isinstance(source, dict) else 'config'}: a search config must be a "
                              "mapping of keys to values")
    try:
        config = SearchConfig.model_validate(data)
    except ValidationError as error:
        raise MergeInputError(f"invalid search config: {format_validation_errors(error)}") from None
    return resolve_paths(config, base_dir)
