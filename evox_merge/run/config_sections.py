"""The search config's sections: one pydantic model per mapping key of `evox_merge.run.config.SearchConfig`
(``algorithm``, ``budget``, ``release``, ``objectives``, ``space``, ``dense``, ``racing``, ``subsample``,
``mergevolve``) and the checks of its scalar keys (``device``, ``dtype``, ``seed``). Torch-free: validating them
imports neither torch nor EvoX (only a CUDA ``device`` imports torch, to count GPUs)."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from evox_merge.algorithms import limits
from evox_merge.run import registry
from evox_merge.util.strict import StrictModel as _Strict

if TYPE_CHECKING:
    from evox_merge.run.config import SearchConfig


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

    ``baselines``: which static merges compete with the searched candidates on the selection part and are reported
    beside the release: ``true`` base, best single, soup, task arithmetic, TIES and DARE
    (`evox_merge.problems.static_names.CONTEST_STATIC_MERGES`), ``all`` every one of ``evox-merge merges``,
    ``false`` none, or a list of names from it. ``rule``: ``best`` releases the
    contest's winner; ``significant`` releases a searched winner only when its selection margin over the best static
    merge is above resampling noise, else that static merge (`evox_merge.run.selection.release_by_rule`; measured
    in benchmarks/results/release_rule.md).
    """

    full_model: bool = False
    adapter_rank: int | None = Field(default=None, ge=1)
    baselines: bool | Literal["all"] | list[str] = True
    rule: Literal[RELEASE_RULES] = "best"

    @field_validator("baselines")
    @classmethod
    def _known_merges(cls, value: bool | str | list[str]) -> bool | str | list[str]:
        from evox_merge.problems.static_names import STATIC_MERGE_NAMES

        if isinstance(value, list):
            unknown = [name for name in value if name not in STATIC_MERGE_NAMES]
            if unknown:
                raise ValueError(f"unknown static merges {unknown}: use names from {list(STATIC_MERGE_NAMES)} "
                                 "(evox-merge merges), or true / false / all")
            if len(set(value)) != len(value):
                raise ValueError(f"a static merge named twice in {value}")
        return value

    def contest(self) -> list[str]:
        """The static merges of the release contest, in `STATIC_MERGE_NAMES` order."""
        from evox_merge.problems.static_names import CONTEST_STATIC_MERGES, STATIC_MERGE_NAMES

        if isinstance(self.baselines, bool):
            return list(CONTEST_STATIC_MERGES) if self.baselines else []
        if self.baselines == "all":
            return list(STATIC_MERGE_NAMES)
        return [name for name in STATIC_MERGE_NAMES if name in self.baselines]


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
