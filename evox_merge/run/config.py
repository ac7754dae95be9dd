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

import ast
import importlib.util
import logging
import math
from pathlib import Path
import re
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from evox_merge.util.errors import MergeInputError, TaskFormatError
from evox_merge.algorithms import limits
from evox_merge.util.layer_names import block_index, lora_layer_names, module_kind
from evox_merge.run import registry
from evox_merge.run.output_dir import output_dir_problem
from evox_merge.tasks.spec import (TaskSpec, check_task_specs, load_task_specs, read_task, split_overlap,
                                   split_task, task_spec_from_dict)
from evox_merge.util.hub import is_dense_expert, is_hub_id, local_path, read_model_config, resolve_model
from evox_merge.util.adapter_files import expert_problems, task_spec_file_problem
from evox_merge.util.yaml_file import read_yaml
from evox_merge.util.strict import StrictModel as _Strict
from evox_merge.util.strict import format_validation_errors

logger = logging.getLogger(__name__)


class AlgorithmConfig(_Strict):
    """Which algorithm searches, and its constructor arguments.

    ``name`` is a name of `evox_merge.run.registry` (``evogm``, ``cmaes``, ``pso``, ``random`` and EvoGM's
    ablations; ``evox-merge algorithms`` lists them) or an import path to any EvoX Algorithm class
    (``evox.algorithms.DE``). ``pop_size``, ``lb`` and ``ub`` go to every algorithm that takes them; ``params``
    holds the rest (e.g. EvoGM's ``num_rounds``, ``iterations_per_round``, ``winner_ratio``), checked against the
    constructor. ``lb``/``ub``: the box every candidate's coefficients lie in (default `limits.DEFAULT_LB` /
    `limits.DEFAULT_UB`, benchmarks/results/search_box.md). ``start``: ``static`` tunes the static merges on the
    search part before the search and starts it from the linear ones (`registry.start_points`), ``default`` from
    the algorithm's own start (`limits.STARTS`).
    """

    name: str = "evogm"
    pop_size: int = Field(default=20, ge=1)
    lb: float = limits.DEFAULT_LB
    ub: float = limits.DEFAULT_UB
    start: Literal[limits.STARTS] = limits.DEFAULT_START
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        # A registered name, or something shaped like an import path (imported and checked last, in load_config).
        module, dot, attribute = name.rpartition(".")
        if name not in registry.ALGORITHMS and not (dot and module and attribute.isidentifier()):
            raise ValueError(f"unknown algorithm {name!r}: use one of {registry.algorithm_names()} or an import "
                             "path such as 'evox.algorithms.DE'")
        return name

    @field_validator("lb", "ub")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value}")
        return value

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


RELEASE_RULES = ("best", "significant")
"""How the release is chosen from the selection contest (`evox_merge.run.selection.release_by_rule`)."""


class ReleaseConfig(_Strict):
    """What the release packet holds besides the recipe and the merged LoRA adapter.

    ``baselines``: the static merges (`evox_merge.problems.static_merges.STATIC_MERGES`) compete with the searched
    candidates on the selection part and are reported beside the release. ``rule``: ``best`` releases the
    contest's winner; ``significant`` releases a searched winner only when its selection margin over the best static
    merge is above resampling noise, else that static merge (`evox_merge.run.selection.release_by_rule`; measured
    in benchmarks/results/release_rule.md).
    """

    full_model: bool = False
    adapter_rank: int | None = Field(default=None, ge=1)
    baselines: bool = True
    rule: Literal[RELEASE_RULES] = "best"


class ObjectivesConfig(_Strict):
    """``objectives: {kind: pareto, groups: [[taskA, taskB], [taskC]], challengers: 3}``.

    ``kind: mean`` is the default search (one fitness, the weighted mean of normalised task scores). ``kind: pareto``
    makes each group one objective (its tasks' weighted mean of normalised scores; no ``groups``: one objective per
    task); every task in at most one group, no empty group, no unknown task, and objective names that make distinct
    folders (`check_objectives`). ``challengers``: up to this many releases spread along the front besides the
    champion and the specialists (`evox_merge.run.pareto_release`).
    """

    kind: Literal["mean", "pareto"] = "mean"
    groups: list[list[str]] | None = None
    challengers: int = Field(default=3, ge=0)


def check_objectives(objectives: "str | ObjectivesConfig", task_names: list[str], algorithm: str) -> list[str]:
    """Problems (messages naming the key) with the objectives' groups against the task names, and with an
    algorithm that needs objective vectors under ``objectives: mean``."""
    kind = objectives if isinstance(objectives, str) else objectives.kind
    groups = None if isinstance(objectives, str) else objectives.groups
    problems = []
    if kind == "mean" and groups is not None:
        problems.append("objectives.groups: groups need kind: pareto (kind: mean has one objective)")
    if kind == "mean" and algorithm in registry.ALGORITHMS and registry.ALGORITHMS[algorithm].multi_objective:
        problems.append(f"algorithm.name: {algorithm!r} is multi-objective; set objectives: pareto (or a "
                        "{kind: pareto, groups: [...]} mapping)")
    if groups is None:
        return problems + (_check_objective_folders(task_names) if kind == "pareto" else [])
    if not groups:
        problems.append("objectives.groups: no groups; give at least one list of task names, or leave groups out "
                        "for one objective per task")
    seen: dict[str, int] = {}
    for index, group in enumerate(groups):
        if not group:
            problems.append(f"objectives.groups[{index}]: empty group; expected at least one task name")
        for name in group:
            if name not in task_names:
                problems.append(f"objectives.groups[{index}]: unknown task {name!r}; the tasks are {task_names}")
            elif name in seen:
                problems.append(f"objectives.groups[{index}]: task {name!r} is already in objectives.groups"
                                f"[{seen[name]}]; a task belongs to at most one objective")
            else:
                seen[name] = index
    return problems + ([] if problems else _check_objective_folders(objective_names(groups, task_names)))


def objective_names(groups: list[list[str]] | None, task_names: list[str]) -> list[str]:
    """The objectives' names under ``objectives: pareto``: each group's task names joined by ``+`` (without groups,
    one objective per task, named as the task)."""
    return list(task_names) if groups is None else ["+".join(group) for group in groups]


def objective_folder(name: str) -> str:
    """The folder of an objective's specialist (``specialists/<folder>/``): its name with every character but
    letters, digits and ``. _ + -`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def _check_objective_folders(names: list[str]) -> list[str]:
    """Problems with the objectives' names as record keys and folder names: each must be its own folder under
    ``specialists/`` (not ``.`` or ``..``, distinct after `objective_folder` even in letter case, at most 255 bytes)."""
    allowed = ("objective names (a task's name, or a group's task names joined by +) become folder names "
               "specialists/<name>/: use letters, digits and . _ + - (any other character becomes _), not '.' or "
               "'..', names that stay distinct after that (also in letter case), at most 255 bytes")
    problems, folders = [], {}
    for name in names:
        folder = objective_folder(name)
        if folder in (".", ".."):
            problems.append(f"objectives: objective {name!r} would write specialists/{folder}/, which is not a folder "
                            f"of its own; {allowed}")
        elif len(folder.encode()) > 255:
            problems.append(f"objectives: objective {name[:40]!r}... is {len(folder.encode())} bytes long as a folder "
                            f"name; {allowed}")
        elif folder.lower() in folders:
            other = folders[folder.lower()]
            clash = (f"two objectives are both named {name!r}" if other == name else
                     f"objectives {other!r} and {name!r} would both write specialists/{folder}/")
            problems.append(f"objectives: {clash}; {allowed}")
        else:
            folders[folder.lower()] = name
    return problems


class SpaceConfig(_Strict):
    """The search space (`evox_merge.experts.spaces`): ``expert`` (one coefficient per expert, the default),
    ``layer`` (one per expert per group of target layers: ``by: blocks`` with ``groups: K`` contiguous blocks of
    transformer layers, or ``by: module``, attention vs MLP) or ``operator`` (a TIES / DARE ``method``'s density
    and per-expert weights; DARE's masks from the run's seed)."""

    kind: Literal["expert", "layer", "operator"] = "expert"
    by: Literal["blocks", "module"] | None = None
    groups: int | None = Field(default=None, ge=1)
    method: Literal["ties", "dare_linear", "dare_ties"] | None = None

    @model_validator(mode="after")
    def _options(self) -> "SpaceConfig":
        if self.kind != "layer" and (self.by is not None or self.groups is not None):
            raise ValueError(f"kind {self.kind!r} takes no by/groups (those group layers in kind 'layer')")
        if self.kind != "operator" and self.method is not None:
            raise ValueError(f"kind {self.kind!r} takes no method (the operator of kind 'operator')")
        if self.kind == "layer":
            by = self.by or "blocks"
            if by == "blocks" and self.groups is None:
                raise ValueError("kind 'layer' with by: blocks needs groups: K (contiguous blocks of layers)")
            if by == "module" and self.groups is not None:
                raise ValueError("by: module groups layers by module type; leave groups out")
        return self

    def options(self, seed: int = 0) -> dict[str, Any]:
        """Keyword arguments of `evox_merge.experts.spaces.build_space` (`seed`: DARE's masks in an operator
        space)."""
        if self.kind == "expert":
            return {"kind": "expert"}
        if self.kind == "operator":
            return {"kind": "operator", "method": self.method or "ties", "seed": seed}
        return {"kind": "layer", "by": self.by or "blocks", **({"groups": self.groups} if self.groups else {})}


class DenseConfig(_Strict):
    """How fully fine-tuned (dense) experts' task vectors are kept (`evox_merge.experts.dense`): ``memory`` (in
    RAM, fastest), ``stream`` (read from the experts' safetensors per candidate: only the model and one parameter's
    slices resident) or ``svd`` (each Linear weight's task vector compressed once to ``rank``); ``targets``: regular
    expressions on parameter names to merge (default: every parameter that differs from the base's)."""

    mode: Literal["memory", "stream", "svd"] = "memory"
    rank: int | None = Field(default=None, ge=1)
    targets: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _rank(self) -> "DenseConfig":
        if (self.mode == "svd") != (self.rank is not None):
            raise ValueError("rank: needed with mode: svd (the rank of each compressed task vector), and only then")
        for pattern in self.targets or []:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"targets: {pattern!r} is not a regular expression ({error})") from None
        return self

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `evox_merge.experts.ExpertSet.load`."""
        return {"dense_mode": self.mode, "dense_rank": self.rank, "dense_targets": self.targets}


class RacingConfig(_Strict):
    """Opt-in racing (`evox_merge.problems.racing`): score each population in stages and stop scoring the
    candidates that confidently cannot reach the share the algorithm ranks by or the release's top-k."""

    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    stages: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0], min_length=1)

    @field_validator("stages")
    @classmethod
    def _stages(cls, stages: list[float]) -> list[float]:
        if stages[-1] != 1.0 or any(not a < b for a, b in zip([0.0, *stages], stages)):
            raise ValueError(f"expected fractions increasing within (0, 1] and ending at 1, got {stages}")
        return stages


class SubsampleConfig(_Strict):
    """Opt-in subsample mode (`evox_merge.problems.subsample`): every generation scores its candidates on a fresh
    subset of each task's search part, drawn from the seed and the generation, and re-scores the run's best
    ``elites`` candidates on it so that comparisons across generations stay paired.

    ``size``: examples per task per generation, an integer (a task whose search part is smaller gives all of it)
    or a fraction in (0, 1) of each task's search part. ``elites``: candidates re-scored on every generation's subset (each costs
    one more candidate scored on it)."""

    size: int | float
    elites: int = Field(default=2, ge=1)

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, size: Any) -> int | float:
        if isinstance(size, bool) or not isinstance(size, (int, float)) or (isinstance(size, int) and size < 1):
            raise ValueError(f"expected an integer >= 1 (examples per task) or a fraction in (0, 1), got {size!r}")
        if isinstance(size, float) and not 0 < size < 1:
            raise ValueError(f"a fraction of each task's search part must lie in (0, 1), got {size!r}; write an "
                             "integer for a number of examples")
        return size

    def refusal(self, config: "SearchConfig") -> str | None:
        """Why `config`'s search cannot run in subsample mode (None if it can): the algorithm must be one whose
        held fitness the mode keeps paired (evogm and its scalar variants, cmaes, pso, random), with one fitness
        per candidate, one process and no racing."""
        name = config.algorithm.name
        entry = registry.ALGORITHMS.get(name)
        if entry is None or entry.multi_objective or not (entry.family == "evogm" or name in SUBSAMPLE_ALGORITHMS):
            return (f"subsample: algorithm {name!r} keeps fitness that the subsample mode cannot keep paired; it "
                    f"works with {list(SUBSAMPLE_ALGORITHMS)} and EvoGM's scalar variants")
        if config.objectives != "mean":
            return "subsample: needs objectives: mean (one fitness per candidate)"
        if config.distributed:
            return "subsample: not with distributed: true (the elites are re-scored in one process)"
        if config.racing is not None:
            return "subsample: not with racing (both choose which examples a candidate is scored on)"
        return None


SUBSAMPLE_ALGORITHMS = ("evogm", "cmaes", "pso", "random")
"""Algorithms the subsample mode keeps paired (`evox_merge.run.workflow.refresh_held_fitness`), EvoGM's scalar
variants too."""


class MergevolveConfig(_Strict):
    """An optional last stage: MERGEvolve (`evox_merge.algorithms.mergevolve`) from the selected release, on the
    search part; its final centre replaces the release only if it scores higher on the selection part."""

    generations: int = Field(default=10, ge=1)
    pairs: int = Field(default=4, ge=1)
    sigma: float = Field(default=0.3, gt=0)
    rank: int = Field(default=4, ge=1)
    learning_rate: float = Field(default=1.0, gt=0)


DEVICE = re.compile(r"cpu|cuda(?::(\d+))?")
"""The devices evox-merge runs on: the CPU, or a CUDA GPU (``cuda``, ``cuda:N``)."""


def check_device(device: str) -> str:
    """`device` if it names a device evox-merge runs on and this machine has (a pydantic validator's ValueError
    otherwise). Only a CUDA device imports torch (to count the GPUs); any other name is refused without it."""
    match = DEVICE.fullmatch(device)
    if match is None:
        raise ValueError(f"{device!r} is not a device evox-merge runs on; expected 'cpu', or 'cuda' / 'cuda:N' for "
                         "a CUDA GPU (other torch devices, e.g. 'mps' or 'meta', are not supported)")
    if device == "cpu":
        return device
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine; use 'cpu'")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype a model runs in: `dtype` itself, or for ``auto`` bfloat16 on a CUDA device that supports it
    (about twice float32's speed on tensor cores, half its memory) and float32 otherwise (the CPU included: its
    float32 matmuls are the fast ones). Only a CUDA device imports torch."""
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda"):
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"


SEED_LIMIT = 2 ** 64
"""Seeds are integers from 0 to 2**64 - 1, the range of a torch generator's seed."""


def seed_problem(seed: int) -> str | None:
    """Why `seed` cannot seed a run (outside 0 to 2**64 - 1), or None."""
    if 0 <= seed < SEED_LIMIT:
        return None
    return (f"expected an integer from 0 to 2**64 - 1 ({SEED_LIMIT - 1}), the range of a torch generator's seed; "
            f"got {seed}")


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
        specs = [task_spec_from_dict(item, base_dir, f"tasks[{i}]") for i, item in enumerate(self.tasks)]
        check_task_specs(specs)
        return specs


def constructor_parameters(name: str) -> tuple[str, set[str], bool] | None:
    """(class name, parameter names, takes **kwargs) of a registered algorithm's ``__init__``, read from its source
    with `ast` so that checking params imports nothing; None when the source cannot be read that way (then
    `registry.check_params` imports the class). tests/test_errors.py checks this agrees with `inspect` for every
    registered name."""
    node = _class_node(name)
    if node is None:
        return None
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            args = item.args
            names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs} - {"self"}
            return node.name, names, args.kwarg is not None
    return None


def _class_node(name: str) -> ast.ClassDef | None:
    """The class definition of a registered algorithm, parsed from its source (None if it cannot be read)."""
    module, _, class_name = registry.ALGORITHMS[name].target.partition(":")
    try:
        top, _, rest = module.partition(".")
        package = importlib.util.find_spec(top)
        source = Path(package.submodule_search_locations[0], *rest.split(".")).with_suffix(".py")
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (ImportError, AttributeError, TypeError, IndexError, OSError, SyntaxError, ValueError):
        return None
    return next((node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name), None)


def constructor_defaults(name: str) -> dict[str, Any]:
    """The literal default values of a registered algorithm's ``__init__`` arguments, read from its source with
    `ast` ({} when it cannot be read; tests/test_fast_refusals.py checks they agree with `inspect`)."""
    node = _class_node(name)
    init = next((item for item in node.body if isinstance(item, ast.FunctionDef) and item.name == "__init__"),
                None) if node is not None else None
    if init is None:
        return {}
    args = init.args
    positional = args.posonlyargs + args.args
    pairs = [*zip(positional[len(positional) - len(args.defaults):], args.defaults),
             *zip(args.kwonlyargs, args.kw_defaults)]
    defaults = {}
    for arg, default in pairs:
        try:
            defaults[arg.arg] = ast.literal_eval(default)
        except (ValueError, TypeError, SyntaxError):
            continue
    return defaults


def defines_racing_quota(name: str) -> bool | None:
    """Whether a registered algorithm's class defines ``racing_threshold`` (the
    `evox_merge.algorithms.common.RacingQuota` protocol), read from its source; None when it cannot be read."""
    node = _class_node(name)
    if node is None:
        return None
    return any(isinstance(item, ast.FunctionDef) and item.name == "racing_threshold" for item in node.body)


def check_algorithm_params(name: str, params: dict[str, Any]) -> None:
    """`registry.check_params`, for a registered name without importing the algorithm (same messages)."""
    found = constructor_parameters(name) if name in registry.ALGORITHMS else None
    if found is None:
        registry.check_params(name, params)
        return
    class_name, accepted, takes_kwargs = found
    reserved = registry.reserved_params(name)
    known = sorted(accepted - {"args", "kwargs"} - reserved)
    for key in params:
        if key in reserved:
            raise MergeInputError(registry.reserved_message(name, key))
        if key not in accepted and not takes_kwargs:
            raise MergeInputError(registry.unknown_param_message(key, class_name, known))


def search_dimension(space: SpaceConfig, experts: list[str]) -> int | None:
    """The search space's dimension where the files give it without the model: N (expert space), N + 1 (operator
    space), or N per group of the LoRA experts' target layers (layer space, from their safetensors headers); None
    for a layer space over a dense expert (its targets are known only against the loaded base)."""
    if space.kind == "expert":
        return len(experts)
    if space.kind == "operator":
        return len(experts) + 1
    if not all(Path(expert).is_dir() and not is_dense_expert(expert) for expert in experts):
        return None
    names = {name for expert in experts for name in lora_layer_names(expert)}
    if not names:  # unreadable headers: the experts' own check says why
        return None
    if (space.by or "blocks") == "module":
        return len(experts) * len({module_kind(name) for name in names})
    other = any(block_index(name) is None for name in names)  # such layers form a group of their own
    return len(experts) * (space.groups + other)


def _check_algorithm(config: SearchConfig, experts: list[str], task_names: list[str]) -> list[str]:
    """A registered algorithm's params, population and the arguments that depend on the search's dimension, by the
    rules of `evox_merge.algorithms.limits`, without importing the algorithm (problems naming the key)."""
    algorithm = config.algorithm
    if algorithm.name not in registry.ALGORITHMS:
        return []
    try:
        check_algorithm_params(algorithm.name, algorithm.params)
    except MergeInputError as error:
        return [str(error)]
    entry = registry.ALGORITHMS[algorithm.name]
    groups = None if isinstance(config.objectives, str) else config.objectives.groups
    n_objs = (len(groups) if groups else len(task_names)) if entry.multi_objective else None
    problems = registry.argument_problems(algorithm.name, algorithm.pop_size, algorithm.params, n_objs or None)
    dim = search_dimension(config.space, experts)
    if problems or dim is None:
        return problems
    mean_init = algorithm.params.get("mean_init")
    if mean_init is not None and len(mean_init) != dim:
        problems.append(f"algorithm.params.mean_init: expected {dim} numbers (one per dimension of the "
                        f"{config.space.kind} space), got {len(mean_init)}")
    if entry.family == "evogm":
        arguments = {**constructor_defaults(algorithm.name), **entry.fixed, **algorithm.params}
        basis = limits.evogm_basis_problem(dim, algorithm.pop_size, arguments["num_rounds"],
                                           arguments["iterations_per_round"], arguments["multi_round"])
        problems += [f"algorithm.{basis} ({config.space.kind} space)"] if basis else []
    return problems


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
    problems += _check_algorithm(config, experts, [spec.name for spec in specs])
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
