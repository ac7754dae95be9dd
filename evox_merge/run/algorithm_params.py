"""A registered algorithm's constructor arguments, checked from its source file without importing it: its
parameters and defaults read with `ast` (`constructor_parameters`, `constructor_defaults`), the config's ``params``
against them (`check_algorithm_params`, the same messages as `evox_merge.run.registry.check_params`), and the
population and arguments that depend on the search's dimension (`search_dimension`, `check_algorithm`) by the
torch-free rules of `evox_merge.algorithms.limits`."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evox_merge.algorithms import limits
from evox_merge.run import registry
from evox_merge.util.errors import MergeInputError
from evox_merge.util.hub import is_dense_expert
from evox_merge.util.layer_names import block_index, lora_layer_names, module_kind

if TYPE_CHECKING:
    from evox_merge.run.config import SearchConfig
    from evox_merge.run.config_sections import SpaceConfig


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


def check_algorithm(config: SearchConfig, experts: list[str], task_names: list[str]) -> list[str]:
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
