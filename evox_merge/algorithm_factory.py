"""Build the search algorithm a config names: a built-in one or any EvoX Algorithm by import path."""

from __future__ import annotations

import importlib
import inspect

import torch
from evox.core import Algorithm

from evox_merge.algorithms import BoundedCMAES, BoundedPSO, EvoGM, RandomSearch
from evox_merge.config import AlgorithmConfig
from evox_merge.errors import MergeInputError

BUILT_IN = {"evogm": EvoGM, "cmaes": BoundedCMAES, "pso": BoundedPSO, "random": RandomSearch}


def algorithm_class(name: str) -> type[Algorithm]:
    """The class for a built-in name or an import path such as ``evox.algorithms.DE``."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    module, _, attribute = name.rpartition(".")
    cls = getattr(importlib.import_module(module), attribute)
    if not (inspect.isclass(cls) and issubclass(cls, Algorithm)):
        raise MergeInputError(f"algorithm.name: {name!r} is not an evox.core.Algorithm subclass")
    return cls


def build_algorithm(config: AlgorithmConfig, num_experts: int, seed: int) -> Algorithm:
    """Construct the algorithm for `num_experts` coefficients with the config's population, bounds and params.

    Built-in algorithms take ``seed`` themselves. A foreign EvoX algorithm gets ``pop_size``, ``lb`` and ``ub``
    (as ``(N,)`` tensors) when its constructor takes them, plus ``params``; torch's global RNG is seeded with
    `seed` first, since EvoX algorithms draw their initial population from it.
    """
    cls = algorithm_class(config.name)
    if config.name in BUILT_IN:
        kwargs = {"pop_size": config.pop_size, "lb": config.lb, "ub": config.ub, "seed": seed}
        return cls(num_experts, **kwargs, **config.params)
    accepted = inspect.signature(cls.__init__).parameters
    offered = {
        "pop_size": config.pop_size,
        "lb": torch.full((num_experts,), config.lb),
        "ub": torch.full((num_experts,), config.ub),
    }
    kwargs = {key: value for key, value in offered.items() if key in accepted and key not in config.params}
    torch.manual_seed(seed)
    try:
        return cls(**kwargs, **config.params)
    except TypeError as error:
        raise MergeInputError(f"algorithm.params: cannot build {config.name} with {sorted({**kwargs, **config.params})}: {error}") from error
