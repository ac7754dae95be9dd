"""The default search on the offline zoo: what `evox-merge search --zoo` runs (the quick start's main job)."""

from __future__ import annotations

from pathlib import Path

from evox_merge.run.config import SearchConfig, load_config
from evox_merge.tasks import TaskSpec


def zoo_paths(
    preset: str = "tiny", seed: int = 0, zoo_dir: str | Path | None = None
) -> tuple[str, list[str], list[TaskSpec], list[TaskSpec]]:
    """Base directory, adapter directories, seen and unseen task specs of a zoo (built into its cache if missing)."""
    from evox_merge.zoo import build_zoo, load_zoo

    zoo = load_zoo(build_zoo(zoo_dir, preset=preset, seed=seed))
    return str(zoo.base_dir), [str(path) for path in zoo.adapter_dirs], zoo.seen_tasks, zoo.unseen_tasks


def zoo_search_config(
    out: str | Path | None = None, zoo_dir: str | Path | None = None, preset: str = "tiny", seed: int = 0
) -> SearchConfig:
    """EvoGM on every unseen task of the zoo at once (mean validation score), with the paper's budget:
    P = 2N, 2 rounds x 3 iterations, i.e. 16N evaluations, searching on the first 30 validation examples of
    each task so the quick start takes minutes on 2 CPU cores (the release is scored on every example)."""
    base, experts, _, unseen = zoo_paths(preset, seed, zoo_dir)
    pop_size = 2 * len(experts)
    return load_config({
        "base": base,
        "experts": experts,
        "tasks": [spec.to_dict() for spec in unseen],
        "algorithm": {"name": "evogm", "pop_size": pop_size,
                      "params": {"num_rounds": 2, "iterations_per_round": 3}},
        "budget": {"generations": 8},
        "seed": seed,
        "batch_size": 128,
        "max_validation_examples": 30,
        "output_dir": str(Path(out).resolve()) if out else str(Path("runs", f"zoo-{preset}-evogm").resolve()),
        "intended_use": f"Demonstration: a merge of the offline zoo's '{preset}' experts for its unseen tasks.",
    })
