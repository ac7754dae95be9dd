"""evox-merge: evolutionary merging of LLM experts as EvoX plug-ins.

The package is layered; each folder imports only from the ones above it in this list:

- `evox_merge.util`: errors, atomic writes, hashes, the machine description, strict config models.
- `evox_merge.experts`: LoRA adapters checked against a base model (`ExpertSet`), the merge kernel and the
  in-place merger. `evox_merge.tasks`: task specs, batching and scorers.
- `evox_merge.problems`: `MergeProblem` (an EvoX Problem), static merges, synthetic landscapes.
  `evox_merge.algorithms`: `EvoGM`, `BoundedCMAES`, `BoundedPSO`, `RandomSearch` (EvoX Algorithms).
- `evox_merge.run`: the only layer that wires an algorithm to a problem: config, registry, the generation loop,
  monitor and records, checkpoints, distributed ranks, release selection and the release packet (`run_search`).
- `evox_merge.zoo`: the offline model zoo (data for the quick start, tests and benchmarks).
- `evox_merge.cli`: the `evox-merge` command.

The names below are importable from the top level; they load on first use, so ``import evox_merge`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExpertSet": "evox_merge.experts",
    "TaskSpec": "evox_merge.tasks",
    "MergeProblem": "evox_merge.problems",
    "EvoGM": "evox_merge.algorithms",
    "BoundedCMAES": "evox_merge.algorithms",
    "BoundedPSO": "evox_merge.algorithms",
    "RandomSearch": "evox_merge.algorithms",
    "build_workflow": "evox_merge.run.workflow",
    "load_config": "evox_merge.run.config",
    "run_search": "evox_merge.run.search",
    "build_zoo": "evox_merge.zoo",
    "load_zoo": "evox_merge.zoo",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'evox_merge' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
