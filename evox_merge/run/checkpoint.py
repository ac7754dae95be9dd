"""Search checkpoints: the workflow's state plus every RNG and counter, written atomically each generation."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evox_merge.util.atomic import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str | Path, workflow: torch.nn.Module, counters: dict[str, Any]) -> None:
    """Write the workflow's `state_dict` (algorithm state included), the RNG states and `counters` atomically."""
    state = {
        "workflow": workflow.state_dict(),
        "torch_rng": torch.random.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "counters": counters,
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, workflow: torch.nn.Module) -> dict[str, Any]:
    """Restore the workflow and the RNG states from `path`; return the saved counters."""
    state = torch.load(path, weights_only=False)
    workflow.load_state_dict(state["workflow"])
    torch.random.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["counters"]
