"""The merging setup a sweep runs on: the offline zoo, or an explicit base, experts and task spec files."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.sweep.config import SetupConfig
from evox_merge.experts import ExpertSet
from evox_merge.tasks import TaskSpec, load_task_specs


@dataclass
class BenchSetup:
    """Experts loaded once, every task spec by name, and which tasks are seen (experts' own) or unseen."""

    experts: ExpertSet
    specs: dict[str, TaskSpec]
    seen: list[str]
    unseen: list[str]


def load_setup(config: SetupConfig) -> BenchSetup:
    """Load the setup a sweep config names (building the zoo preset into its cache if needed)."""
    if config.base is not None:
        base, experts = config.base, config.experts
        seen, unseen = load_task_specs(config.seen_tasks), load_task_specs(config.unseen_tasks)
    else:
        from evox_merge.run.zoo_search import zoo_paths

        base, experts, seen, unseen = zoo_paths(config.zoo_preset, config.zoo_seed, config.zoo_dir)
    return BenchSetup(
        experts=ExpertSet.load(base, experts, device=config.device),
        specs={spec.name: spec for spec in [*seen, *unseen]},
        seen=[spec.name for spec in seen],
        unseen=[spec.name for spec in unseen],
    )
