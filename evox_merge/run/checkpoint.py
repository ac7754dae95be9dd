"""Search checkpoints: the workflow's state plus every RNG and counter, written atomically each generation."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evox_merge.util.atomic import atomic_path
from evox_merge.util.errors import RunStateError


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


_ADVICE = ("the output directory's run cannot be continued from it; start again with --overwrite (records.jsonl "
           "and the checkpoint are replaced)")


def _read_state(path: str | Path) -> dict[str, Any]:
    """The checkpoint's saved dict, checked to be readable and complete (RunStateError naming the file if not)."""
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as error:  # EOFError, pickle/zip errors: an empty or truncated file
        raise RunStateError(f"{path}: not a readable checkpoint ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else 'empty file'}); {_ADVICE}") from None
    missing = [key for key in ("workflow", "torch_rng", "python_rng", "numpy_rng", "counters")
               if not isinstance(state, dict) or key not in state]
    if missing or not isinstance(state["counters"], dict) or not isinstance(state["counters"].get("records"), int):
        raise RunStateError(f"{path}: not an evox-merge checkpoint (missing {missing or ['counters.records']}); "
                            f"{_ADVICE}")
    return state


def read_checkpoint_counters(path: str | Path) -> dict[str, Any]:
    """The counters of a checkpoint (generation, records, best, elapsed), checked without any model."""
    return _read_state(path)["counters"]


def load_checkpoint(path: str | Path, workflow: torch.nn.Module) -> dict[str, Any]:
    """Restore the workflow and the RNG states from `path`; return the saved counters.

    Raises:
        RunStateError: an empty, truncated or foreign checkpoint file, or one saved by another search setup.
    """
    state = _read_state(path)
    try:
        workflow.load_state_dict(state["workflow"])
    except (RuntimeError, KeyError, ValueError) as error:
        raise RunStateError(f"{path}: does not fit this search's algorithm and problem "
                            f"({str(error).splitlines()[0]}); {_ADVICE}") from None
    torch.random.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["counters"]
