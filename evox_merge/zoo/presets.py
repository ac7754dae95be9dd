"""Build settings of the zoo presets (model size, training steps, split sizes) and each expert's LoRA shape."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from evox_merge.util.errors import ZooError
from evox_merge.zoo.lora_shape import LoraShape

# Two ranks, and one expert (next letter, a per-character map) that adapts only the MLP.
EXPERT_LORA: dict[str, LoraShape] = {
    "reverse": LoraShape(8, 16),
    "sort": LoraShape(8, 16),
    "next": LoraShape(4, 8, ("gate_proj", "up_proj", "down_proj")),
    "double": LoraShape(4, 8),
    "skip": LoraShape(8, 16),
    "rotate": LoraShape(8, 16),
    "digit_sum": LoraShape(8, 16),
    "length": LoraShape(4, 8),
}


@dataclass(frozen=True)
class ZooPreset:
    """Everything that decides a zoo's bytes besides the seed.

    Attributes:
        name: ``micro`` (tests), ``tiny`` (quick start, CI) or ``small`` (benchmarks).
        hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads: the Qwen2 base model.
        base_steps, base_batch_size, base_lr: training of the base from random initialisation on every family
            (AdamW, linear warm-up over the first 10% of steps, then cosine decay to 0).
        expert_steps, expert_batch_size, expert_lr: LoRA fine-tuning of each expert from the base.
        replay_fraction: share of each expert's rows drawn from the base's mixture rather than its own family.
        anchor_weight: weight of the KL term that keeps the expert's predictions on those replay rows equal to
            the base's (0: fit the replay rows' answers instead). Without either, an expert forgets the other
            skills and experts destroy each other when merged.
        validation_size, test_size: examples per task and split.
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    base_steps: int
    base_batch_size: int
    base_lr: float
    expert_steps: int
    expert_batch_size: int
    expert_lr: float
    replay_fraction: float
    validation_size: int
    test_size: int
    anchor_weight: float = 2.0
    weight_decay: float = 0.01
    max_positions: int = 64

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings, including the expert LoRA shapes."""
        return {**asdict(self), "experts": {name: asdict(shape) for name, shape in EXPERT_LORA.items()}}


PRESETS: dict[str, ZooPreset] = {
    preset.name: preset
    for preset in [
        # For tests: the same files and checks, built in seconds; the scores mean nothing.
        ZooPreset("micro", 32, 64, 2, 2, 1, base_steps=30, base_batch_size=16, base_lr=3e-3, expert_steps=6,
                  expert_batch_size=8, expert_lr=3e-3, replay_fraction=0.4, validation_size=8, test_size=40),
        # The quick start and CI: about 6 minutes on one core, 6 MB; see benchmarks/results/zoo.md.
        ZooPreset("tiny", 128, 512, 4, 4, 2, base_steps=250, base_batch_size=64, base_lr=2e-3, expert_steps=250,
                  expert_batch_size=32, expert_lr=3e-3, replay_fraction=0.4, validation_size=100, test_size=500),
        # Benchmarks: a wider model, longer training, larger splits.
        ZooPreset("small", 256, 1024, 4, 8, 4, base_steps=300, base_batch_size=64, base_lr=1.5e-3, expert_steps=300,
                  expert_batch_size=32, expert_lr=2e-3, replay_fraction=0.4, validation_size=200, test_size=1000),
    ]
}


# Presets of a downloaded pretrained base rather than one trained here; their settings live with their builder.
PRETRAINED_PRESETS = ("smollm2",)
# Presets of another architecture, trained here by their own builder (``t5``: encoder-decoder, dense experts).
OTHER_PRESETS = ("t5",)


def get_preset(name: str) -> Any:
    """The preset called `name` (a `ZooPreset`, `Smollm2Preset` for ``smollm2``, `T5Preset` for ``t5``); a
    `ZooError` lists the known ones otherwise."""
    if name == "smollm2":
        from evox_merge.zoo.smollm2.settings import SMOLLM2

        return SMOLLM2
    if name == "t5":
        from evox_merge.zoo.t5 import T5

        return T5
    try:
        return PRESETS[name]
    except KeyError:
        known = sorted(PRESETS) + list(PRETRAINED_PRESETS) + list(OTHER_PRESETS)
        raise ZooError(f"unknown zoo preset {name!r}; expected one of {known}") from None
