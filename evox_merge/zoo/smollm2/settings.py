"""The smollm2 preset's settings: split sizes, and each expert's LoRA shape and training length."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from evox_merge.zoo.lora_shape import STANDARD_TARGETS, LoraShape

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertDesign:
    """One expert: its name (also the kind of its training rows, see `data.Examples.training_row`), its LoRA
    shape, and its AdamW steps and batch size."""

    name: str
    shape: LoraShape
    steps: int
    batch_size: int


# Mixed ranks (4-16) and target modules: attention only, MLP only, both.
EXPERTS: tuple[ExpertDesign, ...] = (
    ExpertDesign("gender", LoraShape(4, 8, ("q_proj", "v_proj")), steps=60, batch_size=16),
    ExpertDesign("syllables", LoraShape(8, 16, STANDARD_TARGETS), steps=70, batch_size=16),
    ExpertDesign("stopword", LoraShape(16, 32, ATTENTION), steps=60, batch_size=16),
    ExpertDesign("code", LoraShape(16, 32, MLP), steps=45, batch_size=8),
    ExpertDesign("sotu", LoraShape(8, 16, ATTENTION + ("up_proj", "down_proj")), steps=45, batch_size=8),
    ExpertDesign("moby_dick", LoraShape(4, 8, STANDARD_TARGETS), steps=45, batch_size=8),
)


@dataclass(frozen=True)
class Smollm2Preset:
    """Everything that decides the smollm2 zoo's bytes besides the seed and the pinned downloads.

    Attributes:
        validation_size, test_size: examples per task and split.
        expert_lr: peak learning rate of every expert (warm-up then cosine decay, as in `lm_training.train`).
        replay_fraction, anchor_weight: as in `ZooPreset`: the share of each expert's rows drawn from the other
            experts' training rows, anchored to the base's predictions with this KL weight.
    """

    name: str = "smollm2"
    validation_size: int = 32
    test_size: int = 128
    expert_lr: float = 2e-3
    replay_fraction: float = 0.25
    anchor_weight: float = 1.0
    experts: tuple[ExpertDesign, ...] = field(default=EXPERTS, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (the manifest's ``settings``), with the expert LoRA shapes under ``experts``."""
        data = {k: v for k, v in asdict(self).items() if k != "experts"}
        data["experts"] = {e.name: {**asdict(e.shape), "steps": e.steps, "batch_size": e.batch_size}
                           for e in self.experts}
        return data


SMOLLM2 = Smollm2Preset()
