"""Shared fixtures: a tiny random Qwen2 base with real PEFT LoRA experts and small tasks, built once per session."""

from __future__ import annotations

import pytest
import torch

from evox_merge.experts import ExpertSet
from tiny_models import TinySetup, build_tiny_setup


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """Tiny models run fastest single-threaded; it also keeps 2-core CI machines from oversubscribing."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory) -> TinySetup:
    """A random base model, 4 LoRA experts of different ranks/alphas/targets (one rsLoRA), 3 tasks."""
    return build_tiny_setup(tmp_path_factory.mktemp("tiny"), num_experts=4, seed=0)


@pytest.fixture(scope="session")
def tiny_experts(tiny_setup) -> ExpertSet:
    """The tiny setup loaded as an ExpertSet (shared: tests must leave its weights as they found them)."""
    return ExpertSet.load(tiny_setup.base_dir, tiny_setup.adapter_dirs)
