"""EvoX problems: MergeProblem (merge coefficients -> validation scores) and cheap synthetic landscapes.

The classes are imported on first use, so `evox_merge.problems.static_names` (the static merges' names, which
configs are checked against) is readable without importing torch or EvoX.
"""

import importlib
from typing import Any

_EXPORTS = {
    "MergeProblem": "merge_problem", "NoisyLandscape": "landscapes", "RuggedLandscape": "landscapes",
    "SmoothLandscape": "landscapes", "TaskVectorLandscape": "landscapes", "default_optimum": "landscapes",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
