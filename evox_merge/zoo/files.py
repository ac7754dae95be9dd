"""Where zoos live and the small file-writing rules every zoo builder shares (deterministic JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def default_zoo_dir(preset: str = "tiny", seed: int = 0) -> Path:
    """Where a zoo is cached when no directory is given: ``$EVOX_MERGE_CACHE/zoo/<preset>-seed<seed>``, where
    ``EVOX_MERGE_CACHE`` defaults to ``$XDG_CACHE_HOME/evox-merge`` (``~/.cache/evox-merge``)."""
    cache = os.environ.get("EVOX_MERGE_CACHE")
    if not cache:
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "evox-merge")
    return Path(cache) / "zoo" / f"{preset}-seed{seed}"


def sort_target_modules(config_path: Path) -> None:
    """PEFT writes ``target_modules`` in set order, which changes with Python's hash seed; sort it."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def write_specs(path: Path, specs: list[dict]) -> None:
    """Write a task-spec list as indented JSON."""
    path.write_text(json.dumps(specs, indent=1) + "\n", encoding="utf-8")
