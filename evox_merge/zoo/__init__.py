"""The offline model zoo: a small character-level base model, eight LoRA experts and held-out tasks, built here.

```python
from evox_merge.zoo import build_zoo, load_zoo
zoo = load_zoo(build_zoo(preset="tiny"))        # cached in ~/.cache/evox-merge/zoo/tiny-seed0 after the first build
experts = ExpertSet.load(zoo.base_dir, zoo.adapter_dirs)
problem = MergeProblem(experts, zoo.unseen_tasks)
```

Command line: ``evox-merge zoo build --out DIR --preset tiny --seed 0``. See `evox_merge.zoo.task_suite` for the
task design and ``benchmarks/results/zoo.md`` for the evidence that merging helps on it. ``--preset smollm2`` builds
the same layout on a real pretrained model, SmolLM2-135M-Instruct (see `evox_merge.zoo.smollm2`).
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, so that checking a zoo directory (`evox_merge.zoo.manifest`) does not import torch.
_EXPORTS = {"PRESETS": "evox_merge.zoo.presets", "Zoo": "evox_merge.zoo.loading", "ZooPreset": "evox_merge.zoo.presets",
            "build_zoo": "evox_merge.zoo.build", "default_zoo_dir": "evox_merge.zoo.files",
            "load_zoo": "evox_merge.zoo.loading"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'evox_merge.zoo' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
