"""What the registered algorithms accept, checked without importing torch or EvoX.

The search config checks ``algorithm.pop_size`` and ``algorithm.params`` with these rules before anything heavy is
imported (`evox_merge.run.config`), and the algorithms check their own constructor arguments with the same rules,
so one message refuses a value wherever it comes from. A rule states what the constructor needs to run (EvoX's
asserts and the failures of its first steps), never more. Arguments that take tensors (``mean_init``, bounds) are
checked here as a config gives them (lists, floats); the classes check the tensors themselves.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from evox_merge.util.errors import MergeInputError

Rule = tuple[Callable[[Any], bool], str]

DEFAULT_LB = -0.5
DEFAULT_UB = 1.5
"""The default coefficient box [DEFAULT_LB, DEFAULT_UB]^D, the one search space every algorithm's candidates lie in
(the config's ``algorithm.lb``/``algorithm.ub``, every constructor's ``lb``/``ub``). Chosen on the tiny zoo's search
and selection parts (benchmarks/results/search_box.md): with [-1, 1] the picks sat on the upper edge in 5-9 of 9
runs (EvoGM, CMA-ES, PSO) and never on the lower one; wider boxes freed them but lowered the search-part fitness at
160 evaluations (the algorithms' steps scale with the box); [-0.5, 1.5], as wide as [-1, 1] and shifted up, keeps
every algorithm's edge hits at or under a third of runs and its fitness within noise of [-1, 1]'s."""

STARTS = ("static", "default")
"""``algorithm.start``: ``static`` starts every search from the tuned linear static merges (the ``initial`` argument
of every registered algorithm, `evox_merge.run.registry.build_algorithm`); ``default`` from each algorithm's own
start. Default ``static``: on the tiny zoo (benchmarks/results/search_box.md, 6 seeds x 3 tasks x 4 algorithms) it
raised the search-part fitness (pooled Welch p = 0.013) and the selection-part fitness (p = 0.07) and never ended
below the static merges it started from (random search from the default start did in 8 of 18 runs)."""
DEFAULT_START = "static"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(low: int) -> Rule:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer >= {low}"


def _real(test: Callable[[float], bool], expected: str) -> Rule:
    return (lambda v: _number(v) and test(v)), expected


def _choice(*options: str) -> Rule:
    return (lambda v: v in options), " or ".join(repr(option) for option in options)


def _optional(rule: Rule) -> Rule:
    """`rule`, or None (the constructor's default)."""
    return (lambda v: v is None or rule[0](v)), f"{rule[1]} (or null for the default)"


_BOOL: Rule = (lambda v: isinstance(v, bool)), "true or false"
_FINITE: Rule = _real(lambda v: True, "a finite number")
_NON_NEGATIVE: Rule = _real(lambda v: v >= 0, "a number >= 0")
_NUMBERS: Rule = (lambda v: isinstance(v, (list, tuple)) and all(_number(x) for x in v)), "a list of finite numbers"

EVOGM_VARIANTS = ("default", "paper")
"""`evox_merge.algorithms.evogm_variants.VARIANTS`' names (tests/test_fast_refusals.py checks they agree)."""

RULES: dict[str, dict[str, Rule]] = {
    "EvoGM": {
        "num_rounds": _integer(1),
        "iterations_per_round": _integer(1),
        "winner_ratio": _real(lambda v: 0 < v < 1, "a float in (0, 1)"),
        "hidden_sizes": ((lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                          and all(_integer(1)[0](x) for x in v)), "non-empty positive widths"),
        "lr": _real(lambda v: v > 0, "a number > 0"),
        "train_steps": _integer(1),
        "cycle_weight": _FINITE,
        "opt_weight": _FINITE,
        "single_generator": _BOOL,
        "multi_round": _BOOL,
        "variant": _choice(*EVOGM_VARIANTS),
        "extrapolation": _optional(_real(lambda v: v == 0 or v >= 1, "0 (off) or a float >= 1")),
        "mutation": _optional(_BOOL),
        "initial_sigma": _optional(_real(lambda v: v > 0, "a float > 0")),
        "archive": _optional(_BOOL),
        "duplicate_tolerance": _optional(_real(lambda v: v >= 0, "a float >= 0")),
        "task_arithmetic_scales": _optional(_NUMBERS),
        "newer_ties": _optional(_BOOL),
        "guarded_shift": _optional(_BOOL),
        "max_condition": _optional(_real(lambda v: v > 1, "a float > 1")),
    },
    "EvoGMHybrid": {
        "generative_generations": _integer(1),
        "shrinkage": _real(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "variant": _choice(*EVOGM_VARIANTS),
        "train_steps": _integer(1),
        "hidden_sizes": ((lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                          and all(_integer(1)[0](x) for x in v)), "non-empty positive widths"),
        "boundary": _choice("clip", "reflect"),
    },
    "BoundedCMAES": {
        "sigma": _optional(_real(lambda v: v > 0, "a number > 0")),
        "mean_init": _optional(_NUMBERS),
        "boundary": _choice("clip", "reflect"),
    },
    "BoundedPSO": {"w": _FINITE, "phi_p": _FINITE, "phi_g": _FINITE, "init": _choice("hybrid", "uniform")},
    "PSOMerging": {"w": _FINITE, "c1": _NON_NEGATIVE, "c2": _NON_NEGATIVE,
                   "density": _real(lambda v: 0 < v <= 1, "a float in (0, 1]")},
    "ModelSwarms": {"inertia": _NON_NEGATIVE, "cognitive": _NON_NEGATIVE, "social": _NON_NEGATIVE,
                    "repel": _NON_NEGATIVE, "step_length": _real(lambda v: v > 0, "a number > 0"),
                    "step_decay": _real(lambda v: 0 < v <= 1, "a float in (0, 1]"), "min_step": _NON_NEGATIVE,
                    "restart_patience": _integer(1)},
    "MergeRVEA": {"alpha": _FINITE, "fr": _real(lambda v: v > 0, "a number > 0"), "max_gen": _integer(1)},
    "MergeHypE": {"n_sample": _integer(1)},
}
"""Per algorithm class, its constructor arguments with a valid range: argument -> (test, what is expected)."""

MIN_POP_SIZE: dict[str, tuple[int, str]] = {
    "EvoGM": (2, "a round's history splits into winners and losers"),
    "BoundedCMAES": (2, "its pop_size // 2 best candidates move the mean"),
    "EvoGMHybrid": (2, "CMA-ES's pop_size // 2 best candidates move the mean"),
    "MergeNSGA2": (2, "crossover mates candidates in pairs"),
    "MergeNSGA3": (2, "crossover mates candidates in pairs"),
    "MergeHypE": (2, "crossover mates candidates in pairs"),
}
"""Per algorithm class, the smallest population it runs with and why (below it EvoX fails in its first steps)."""

MOEAD_MIN_WEIGHTS = 11
"""MOEA/D needs a neighbourhood of ceil(weights / 10) >= 2 weight vectors (EvoX fails with an IndexError below)."""


SWARM_PULLS = ("inertia", "cognitive", "social", "repel")
"""`ModelSwarms`' four weights, normalised by their (randomly weighted) sum: not all of them may be 0. Their
defaults are not 0, so only a config that sets all four to 0 breaks the rule."""


def check_arguments(class_name: str, arguments: dict[str, Any]) -> list[str]:
    """Problems (``key: expected ..., got ...``) with constructor `arguments` of algorithm class `class_name`
    (those without a rule pass)."""
    rules = RULES.get(class_name, {})
    problems = [f"{key}: expected {rules[key][1]}, got {value!r}" for key, value in arguments.items()
                if key in rules and not rules[key][0](value)]
    if class_name == "ModelSwarms" and not problems and all(arguments.get(key, 1) == 0 for key in SWARM_PULLS):
        problems.append(f"{SWARM_PULLS[-1]}: expected at least one of {', '.join(SWARM_PULLS)} > 0 (the velocity "
                        "is their weighted mean), got all 0")
    return problems


def raise_for_arguments(class_name: str, arguments: dict[str, Any]) -> None:
    """`check_arguments` for a constructor: MergeInputError naming the first bad argument."""
    problems = check_arguments(class_name, arguments)
    if problems:
        raise MergeInputError(problems[0])


def uniform_weight_count(n: int, m: int) -> int:
    """How many weight vectors `evox.operators.sampling.uniform_sampling(n, m)` draws (Das and Dennis's method,
    Deb and Jain's two layers), counted without building them (tests/test_fast_refusals.py compares)."""
    h1 = 1
    while math.comb(h1 + m, m - 1) <= n:
        h1 += 1
    count = math.comb(h1 + m - 1, m - 1)
    if h1 < m:
        h2 = 0
        while math.comb(h1 + m - 1, m - 1) + math.comb(h2 + m, m - 1) <= n:
            h2 += 1
        if h2 > 0:
            count += math.comb(h2 + m - 1, m - 1)
    return count


def pop_size_problem(class_name: str, pop_size: int, n_objs: int | None = None, label: str = "") -> str | None:
    """Why algorithm class `class_name` (called `label` in the message) cannot run with `pop_size` (`n_objs`
    objectives), or None."""
    if class_name == "MergeMOEAD" and n_objs is not None:
        weights = uniform_weight_count(pop_size, n_objs)
        if math.ceil(weights / 10) < 2:
            return (f"pop_size: MOEA/D turns pop_size {pop_size} into {weights} weight vectors for {n_objs} "
                    f"objectives and needs at least {MOEAD_MIN_WEIGHTS} (a neighbourhood of ceil(P / 10) >= 2)")
    low, why = MIN_POP_SIZE.get(class_name, (1, ""))
    if pop_size < low:
        return f"pop_size: {label or class_name} needs at least {low} ({why}), got {pop_size}"
    return None


def evogm_basis_problem(num_experts: int, pop_size: int, num_rounds: int, iterations_per_round: int,
                        multi_round: bool = True) -> str | None:
    """Why EvoGM's basis shift cannot find `num_experts` vectors in a round, or None (one round needs none)."""
    if not multi_round or num_rounds == 1 or pop_size * (iterations_per_round + 1) >= num_experts:
        return None
    return (f"pop_size: expected pop_size * (iterations_per_round + 1) >= num_experts = {num_experts} so a basis "
            f"shift finds N vectors, got {pop_size}")


def raise_for_evogm(num_experts: int, pop_size: int, arguments: dict[str, Any]) -> None:
    """EvoGM's constructor arguments by the rules a search config is checked with: MergeInputError naming the first
    bad one and what was expected (`arguments` holds ``num_rounds``, ``iterations_per_round``, ``multi_round`` and
    the other ruled ones)."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise MergeInputError(f"num_experts: expected an integer >= 1, got {num_experts!r}")
    problem = pop_size_problem("EvoGM", pop_size)
    if problem:
        raise MergeInputError(problem)
    raise_for_arguments("EvoGM", arguments)
    problem = evogm_basis_problem(num_experts, pop_size, arguments["num_rounds"], arguments["iterations_per_round"],
                                  arguments["multi_round"])
    if problem:
        raise MergeInputError(problem)
