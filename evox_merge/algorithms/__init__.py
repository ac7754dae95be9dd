"""EvoX algorithms for merge-coefficient search: EvoGM, bounded CMA-ES and PSO wrappers, uniform random search.

All share one constructor shape, `Algo(num_experts, pop_size=20, lb=None, ub=None, seed=0, ...)` (None bounds:
the default box, `evox_merge.algorithms.limits.DEFAULT_LB` / ``DEFAULT_UB``), and one budget convention (one step =
one generation of `pop_size` evaluations; `init_step` evaluates the first population), and minimise: run them in
`evox.workflows.StdWorkflow(algo, problem, opt_direction="max")` for higher-is-better scores.

The classes are imported on first use, so `evox_merge.algorithms.limits` (what each algorithm accepts) is readable
without importing torch or EvoX.
"""

import importlib
from typing import Any

_EXPORTS = {
    "VARIANTS": "evogm_variants", "BoundedCMAES": "cmaes", "BoundedPSO": "pso", "EvoGM": "evogm",
    "EvoGMHistory": "evogm_history", "EvoGMSwitches": "evogm_variants", "GeneratorPair": "generators",
    "RandomSearch": "random_search", "PSOMerging": "pso_merging", "ModelSwarms": "model_swarms",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
