"""The algorithm registry: every search method evox-merge knows by name, in one place.

The search config (``algorithm.name``), the CLI (``evox-merge algorithms``) and the benchmark sweep (its
``methods``) all resolve names here. A name is either a registered entry (an algorithm class plus fixed
constructor arguments, so ablations are names too) or an import path to any EvoX `Algorithm` class
(``evox.algorithms.DE``). Classes are imported only when an algorithm is built, so validating a config stays cheap.

What the search hands every registered algorithm (`build_algorithm`): ``num_experts`` (the search's dimension D),
``pop_size``, the box ``lb``/``ub`` (one box for every algorithm: every candidate it hands the problem lies in it,
EvoGM's after a basis shift too; default `evox_merge.algorithms.limits.DEFAULT_LB`/``DEFAULT_UB``), ``seed``, the
search ``space`` where it is not the expert space and the class takes it, and ``initial``: an ``(M, D)`` tensor of
starting points in the search's coordinates, best first (``algorithm.start: static``: the tuned linear static
merges, `start_points`), where the class takes it. Every registered single-objective algorithm takes ``initial``
and evaluates those points in its first generation (CMA-ES: its mean at the first, its step size from their
spread); each repairs them into its box.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

from evox_merge.algorithms import limits
from evox_merge.util.errors import MergeInputError


@dataclass(frozen=True)
class AlgorithmEntry:
    """A registered search method.

    Attributes:
        name: the name configs and sweeps use.
        target: ``module:Class`` of an evox-merge algorithm (constructor ``Class(num_experts, pop_size=, lb=, ub=,
            seed=, ...)``).
        fixed: constructor arguments this entry always passes (e.g. an ablation switch).
        family: ``evogm`` for EvoGM and its variants (they take ``num_rounds`` and ``iterations_per_round``).
        description: one line for ``evox-merge algorithms``.
        multi_objective: the algorithm takes ``n_objs`` (given by the search) and gets the ``(P, M)`` objective
            matrix as fitness; it needs ``objectives: pareto``.
    """

    name: str
    target: str
    description: str
    fixed: dict[str, Any] = field(default_factory=dict)
    family: str = ""
    multi_objective: bool = False

    @property
    def class_name(self) -> str:
        """The name of the class behind the entry (the key of `evox_merge.algorithms.limits`' tables)."""
        return self.target.partition(":")[2]

    def load(self) -> type:
        """The algorithm class (imported now)."""
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)


_EVOGM = "evox_merge.algorithms.evogm:EvoGM"
ALGORITHMS: dict[str, AlgorithmEntry] = {
    entry.name: entry
    for entry in (
        AlgorithmEntry("evogm", _EVOGM, "EvoGM (arXiv 2605.29295) with evox-merge's measured improvements (default)",
                       family="evogm"),
        AlgorithmEntry("evogm_paper", _EVOGM, "EvoGM exactly as the paper (arXiv 2605.29295) describes it",
                       {"variant": "paper"}, "evogm"),
        AlgorithmEntry("evogm_single_generator", _EVOGM, "EvoGM (default variant) ablation: one generator, no cycle loss",
                       {"single_generator": True}, "evogm"),
        AlgorithmEntry("evogm_no_rounds", _EVOGM, "EvoGM (default variant) ablation: one round of R*(T+1)-1 iterations",
                       {"multi_round": False}, "evogm"),
        AlgorithmEntry("evogm_no_cycle", _EVOGM, "EvoGM (default variant) ablation: cycle-consistency weight 0",
                       {"cycle_weight": 0.0}, "evogm"),
        AlgorithmEntry("evogm_pareto", _EVOGM, "EvoGM (default variant), winners and losers by Pareto rank and "
                       "crowding distance (objectives: pareto)", {"objectives": "pareto"}, "evogm", True),
        AlgorithmEntry("evogm_cmaes", "evox_merge.algorithms.evogm_hybrid:EvoGMHybrid", "EvoGM (default variant) "
                       "for its first generations, then CMA-ES from the best found and its elites' spread"),
        AlgorithmEntry("cmaes", "evox_merge.algorithms.cmaes:BoundedCMAES", "CMA-ES (EvoX) kept inside the box"),
        AlgorithmEntry("pso", "evox_merge.algorithms.pso:BoundedPSO", "PSO (EvoX) with clamped velocity, resumable"),
        AlgorithmEntry("random", "evox_merge.algorithms.random_search:RandomSearch", "uniform random search"),
        AlgorithmEntry("pso_merging", "evox_merge.algorithms.pso_merging:PSOMerging", "PSO-Merging (arXiv "
                       "2508.19839): PSO from the base, the experts and sparsified experts"),
        AlgorithmEntry("model_swarms", "evox_merge.algorithms.model_swarms:ModelSwarms", "Model Swarms (arXiv "
                       "2410.11163): experts pulled to the bests, pushed from the worst, decaying steps"),
        *(AlgorithmEntry(name, f"evox_merge.algorithms.multi_objective:{cls}", f"{label} (EvoX), multi-objective "
                         "(objectives: pareto)", multi_objective=True)
          for name, cls, label in (("nsga2", "MergeNSGA2", "NSGA-II"), ("nsga3", "MergeNSGA3", "NSGA-III"),
                                   ("moead", "MergeMOEAD", "MOEA/D"), ("rvea", "MergeRVEA", "RVEA"),
                                   ("hype", "MergeHypE", "HypE"))),
    )
}


# Constructor arguments the search sets from its own config keys (named in the refusal of one in params).
_SET_BY_SEARCH = {"num_experts": "experts", "pop_size": "algorithm.pop_size", "lb": "algorithm.lb",
                  "ub": "algorithm.ub", "seed": "seed", "device": "device", "space": "space",
                  "initial": "algorithm.start"}


def reserved_params(name: str) -> set[str]:
    """Constructor arguments of registered algorithm `name` that the search sets: num_experts, pop_size, lb, ub,
    seed, the device, the search space and the starting points, its fixed arguments, ``n_objs`` for a multi-objective one, and EvoGM's
    ``objectives`` and ``n_objs`` (``evogm_pareto`` is EvoGM with Pareto objectives)."""
    entry = ALGORITHMS[name]
    vector = ("n_objs",) if entry.multi_objective else ("objectives", "n_objs") if entry.family == "evogm" else ()
    return {*_SET_BY_SEARCH, *entry.fixed, *vector}


def reserved_message(name: str, key: str) -> str:
    """The refusal of reserved constructor argument `key` in ``algorithm.params`` of registered algorithm `name`."""
    instead = _SET_BY_SEARCH.get(key) or ("objectives, with algorithm.name evogm_pareto" if key == "objectives"
                                          else "objectives" if key == "n_objs" else f"a name other than {name!r}")
    return (f"algorithm.params.{key}: set by the search itself (or fixed by {name!r}); use the algorithm's own "
            f"config key ({instead})")


def unknown_param_message(key: str, class_name: str, known: list[str]) -> str:
    """The refusal of ``algorithm.params.<key>`` that `class_name`'s constructor does not take (`known`: those it
    takes besides what the search sets)."""
    takes = f"it takes {known}" if known else ("it takes none (pop_size, lb, ub, seed and device are config keys, "
                                              "not params)")
    return f"algorithm.params.{key}: {class_name} takes no such argument; {takes}"


def argument_problems(name: str, pop_size: int, params: dict[str, Any], n_objs: int | None = None) -> list[str]:
    """What registered algorithm `name` cannot run with, by the rules of `evox_merge.algorithms.limits` (nothing is
    imported): its population (`n_objs`: the objectives of a multi-objective one) and the values in `params`."""
    class_name = ALGORITHMS[name].class_name
    problems = [f"algorithm.params.{problem}" for problem in limits.check_arguments(class_name, params)]
    population = limits.pop_size_problem(class_name, pop_size, n_objs, label=name)
    return ([f"algorithm.{population}"] if population else []) + problems


def is_multi_objective(name: str) -> bool:
    """Whether algorithm `name` gets objective vectors: a multi-objective registry entry, or an EvoX class taking
    ``n_objs`` (imported to look)."""
    if name in ALGORITHMS:
        return ALGORITHMS[name].multi_objective
    return "n_objs" in inspect.signature(_foreign_class(name).__init__).parameters


def algorithm_names() -> list[str]:
    """Every registered name, in registry order."""
    return list(ALGORITHMS)


def _foreign_class(name: str) -> type:
    """An EvoX Algorithm class by import path; MergeInputError naming the key when it is not one."""
    from evox.core import Algorithm

    module, _, attribute = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError):
        raise MergeInputError(
            f"algorithm.name: unknown algorithm {name!r}: use one of {algorithm_names()} or an import path such as "
            "'evox.algorithms.DE'"
        ) from None
    if not (inspect.isclass(cls) and issubclass(cls, Algorithm)):
        raise MergeInputError(f"algorithm.name: {name!r} is not an evox.core.Algorithm subclass")
    return cls


def algorithm_class(name: str) -> type:
    """The class behind a registered name or an EvoX import path (MergeInputError naming the key otherwise)."""
    return ALGORITHMS[name].load() if name in ALGORITHMS else _foreign_class(name)


def check_params(name: str, params: dict[str, Any]) -> None:
    """Check `params` against the constructor of algorithm `name`, before any model loads.

    Raises:
        MergeInputError: a param the constructor does not take (named, with the ones it does take), or one the
            search sets itself.
    """
    cls = algorithm_class(name)
    reserved = reserved_params(name) if name in ALGORITHMS else {"pop_size", "lb", "ub", "n_objs"}
    accepted = inspect.signature(cls.__init__).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    known = sorted(set(accepted) - {"self", "args", "kwargs"} - reserved)
    for key in params:
        if key in reserved and name in ALGORITHMS:
            raise MergeInputError(reserved_message(name, key))
        if key not in accepted and not takes_kwargs:
            raise MergeInputError(unknown_param_message(key, cls.__name__, known))


def build_algorithm(
    name: str, num_experts: int, *, pop_size: int, lb: float = limits.DEFAULT_LB, ub: float = limits.DEFAULT_UB,
    seed: int = 0, params: dict[str, Any] | None = None, n_objs: int | None = None, space: Any = None,
    initial: Any = None,
):
    """Construct the algorithm `name` for `num_experts` coefficients.

    Registered algorithms get ``num_experts``, ``pop_size``, ``lb``, ``ub``, ``seed``, their fixed arguments and
    `params`, and a multi-objective one ``n_objs`` (required for it). A foreign EvoX algorithm gets ``pop_size``,
    ``lb`` and ``ub`` (as ``(N,)`` tensors) and ``n_objs`` where its constructor takes them, plus `params`; torch's
    global RNG is seeded with `seed` first, since EvoX algorithms draw their initial population from it.

    `space`: the problem's search space (`evox_merge.experts.spaces`), whose dimension is then ``num_experts``.
    Registered algorithms that start from particular merges (EvoGM's average and one-hot experts, CMA-ES's
    average, PSO's hybrid swarm) take it to write those merges in its coordinates; the expert space needs nothing.

    `initial`: ``(M, num_experts)`` starting points, best first (`start_points`), for a registered class that takes
    ``initial`` (all single-objective ones); MergeInputError for one that does not.
    """
    import torch

    params = dict(params or {})
    check_params(name, params)
    if name in ALGORITHMS:
        entry = ALGORITHMS[name]
        if entry.multi_objective:
            if n_objs is None:
                raise MergeInputError(f"algorithm.name: {name!r} is multi-objective; set objectives: pareto")
            params["n_objs"] = n_objs
        cls = entry.load()
        accepted = inspect.signature(cls.__init__).parameters
        if space is not None and space.kind != "expert" and "space" in accepted:
            params["space"] = space
        if initial is not None:
            if "initial" not in accepted:
                raise MergeInputError(f"initial: {name!r} takes no starting points (takes_starting_points)")
            params["initial"] = initial
        try:
            return cls(num_experts, pop_size=pop_size, lb=lb, ub=ub, seed=seed, **entry.fixed, **params)
        except (AssertionError, TypeError, ValueError) as error:  # what the limits do not foresee, still named
            raise MergeInputError(f"algorithm: cannot build {name!r} with pop_size {pop_size} and params "
                                  f"{sorted(params)}: {_constructor_failure(error)}") from error
    cls = _foreign_class(name)
    accepted = inspect.signature(cls.__init__).parameters
    offered = {"pop_size": pop_size, "lb": torch.full((num_experts,), lb), "ub": torch.full((num_experts,), ub),
               **({"n_objs": n_objs} if n_objs is not None else {})}
    kwargs = {key: value for key, value in offered.items() if key in accepted and key not in params}
    torch.manual_seed(seed)
    try:
        return cls(**kwargs, **params)
    except (AssertionError, TypeError, ValueError) as error:
        raise MergeInputError(f"algorithm.params: cannot build {name} with {sorted({**kwargs, **params})}: "
                              f"{_constructor_failure(error)}") from error


def takes_starting_points(name: str) -> bool:
    """Whether algorithm `name` (registered, or an EvoX import path) takes ``initial`` starting points (imports its
    class): every registered single-objective algorithm does."""
    return "initial" in inspect.signature(algorithm_class(name).__init__).parameters


def start_points(statics: list[Any], space: Any = None) -> tuple[Any, list[str]]:
    """The starting points of ``algorithm.start: static``: the linear static merges among `statics` (the release
    contest's `evox_merge.run.selection.Candidate`s tuned on the search part; linear: coefficients in the expert
    basis, ``merge.coefficients`` not None), best search-part fitness first, exact repeats dropped, written in the
    search `space`'s coordinates (``space.from_expert``). Returns an ``(M, D)`` float32 tensor (None when no static
    merge is linear) and the merges' names in its row order."""
    import torch

    linear = [c for c in statics if c.merge.coefficients is not None and c.merge.space is None]
    linear.sort(key=lambda c: -c.search_fitness if c.search_fitness == c.search_fitness else float("inf"))
    rows: list[Any] = []
    names: list[str] = []
    for candidate in linear:
        row = candidate.merge.coefficients.detach().float().cpu()
        if not any(torch.equal(row, kept) for kept in rows):
            rows.append(row)
            names.append(candidate.name)
    if not rows:
        return None, []
    points = torch.stack(rows)
    if space is not None and space.kind != "expert":
        points = space.from_expert(points).float()
    return points, names


def _constructor_failure(error: Exception) -> str:
    """An algorithm constructor's exception in words (EvoX's asserts often carry no message)."""
    if str(error):
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return (f"{type(error).__name__} in its constructor (an argument outside its valid range: check pop_size and "
            "params against the class's documentation)")


def is_evogm(name: str) -> bool:
    """Whether `name` is EvoGM or one of its registered variants (they take rounds and iterations)."""
    return name in ALGORITHMS and ALGORITHMS[name].family == "evogm"


def racing_for(algorithm: Any, confidence: float, stages: list[float], top_k: int):
    """The `evox_merge.problems.racing.Racing` settings for a release that looks at the run's best `top_k`, and
    `algorithm`'s racing threshold (pass both to `MergeProblem.race`); MergeInputError for an algorithm that does
    not say which candidates it uses."""
    from evox_merge.algorithms.common import RacingQuota
    from evox_merge.problems.racing import Racing

    if not isinstance(algorithm, RacingQuota):
        raise MergeInputError(f"racing: {type(algorithm).__name__} does not say which candidates it uses (no "
                              "racing_threshold()); racing works with evogm, cmaes and random")
    return Racing(top_k=top_k, confidence=confidence, stages=tuple(stages)), algorithm.racing_threshold
