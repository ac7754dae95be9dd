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

from evox_merge.zoo.build import build_zoo, default_zoo_dir
from evox_merge.zoo.loading import Zoo, load_zoo
from evox_merge.zoo.presets import PRESETS, ZooPreset

__all__ = ["PRESETS", "Zoo", "ZooPreset", "build_zoo", "default_zoo_dir", "load_zoo"]
