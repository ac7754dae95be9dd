"""Experts and the merge kernel: PEFT LoRA adapters checked against a base model, their factors stacked per
target layer, the pure merge formula and the in-place merger that writes it into the model."""

from evox_merge.experts.expert_set import ExpertSet
from evox_merge.experts.kernel import LayerFactors

__all__ = ["ExpertSet", "LayerFactors"]
