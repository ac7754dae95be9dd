"""The default search on the offline zoo: what `evox-merge search --zoo` runs (the quick start's main job)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from evox_merge.run.config import SearchConfig, load_config, seed_problem
from evox_merge.tasks import TaskSpec
from evox_merge.util.errors import MergeInputError, ZooError
from evox_merge.util.ownership import output_path_problem

if TYPE_CHECKING:
    from evox_merge.zoo.manifest import ZooPlan


def zoo_paths(
    preset: str = "tiny", seed: int = 0, zoo_dir: str | Path | None = None
) -> tuple[str, list[str], list[TaskSpec], list[TaskSpec]]:
    """Base directory, adapter directories, seen and unseen task specs of a zoo (built into its cache if missing)."""
    from evox_merge.zoo import build_zoo, load_zoo

    zoo = load_zoo(build_zoo(zoo_dir, preset=preset, seed=seed))
    return str(zoo.base_dir), [str(path) for path in zoo.adapter_dirs], zoo.seen_tasks, zoo.unseen_tasks


def check_zoo_arguments(zoo_dir: str | Path | None, preset: str, seed: int,
                        keys: tuple[str, str, str] = ("--preset", "--zoo-dir", "--seed"),
                        rebuild: bool = False) -> ZooPlan:
    """What the files can say about a zoo's arguments, before the zoo is built or torch imported: the seed's range,
    the preset's name, and whether the zoo directory (`zoo_dir`, else the cache) can be reused or built
    (`evox_merge.zoo.manifest.plan_target`: never a file, nor a folder of other files; with `rebuild`, a zoo whose
    files changed may be replaced) and, where it is to be built, written (`zoo_path_problem`). `keys`: how
    messages name the preset, the zoo directory and the seed (the command's flags, or a config's keys). Returns
    the `evox_merge.zoo.manifest.ZooPlan`.

    Raises:
        MergeInputError: a seed outside 0 to 2**64 - 1.
        ZooError: an unknown preset, or a zoo directory a build may not use or cannot write (naming it and what to
            do).
    """
    from evox_merge.zoo.files import default_zoo_dir
    from evox_merge.zoo.manifest import plan_target
    from evox_merge.zoo.presets import get_preset

    problem = seed_problem(seed)
    if problem:
        raise MergeInputError(f"{keys[2]}: {problem}")
    try:
        settings = get_preset(preset).to_dict()
    except ZooError as error:
        raise ZooError(f"{keys[0]}: {error}") from None
    root = Path(zoo_dir) if zoo_dir is not None else default_zoo_dir(preset, seed)
    if root.exists() and not root.is_dir():
        raise ZooError(f"{keys[1]}: {root} is a file; expected a zoo directory (built there when it is missing or "
                       "empty)")
    plan = plan_target(root, preset, seed, settings, rebuild)
    if plan.action != "reuse" and (problem := zoo_path_problem(root, keys[1] if zoo_dir is not None else
                                                               f"{keys[1]} (default: the zoo cache)")) is not None:
        raise ZooError(problem)
    return plan


def zoo_path_problem(root: Path, option: str) -> str | None:
    """Why a zoo cannot be built at `root` (named `option`) as far as the paths tell: a file above it, or a folder
    where its staging folder cannot be created (`evox_merge.util.ownership.output_path_problem`; a build writes
    beside `root`, then renames its staging folder onto it); None when it can."""
    return output_path_problem(root.absolute(), option, "a zoo directory in a folder that can be created and "
                                                        "written (a build writes beside it, then renames)",
                               beside=True)


def zoo_output_dir(out: str | Path | None, preset: str) -> Path:
    """The output folder of ``search --zoo``: `out`, else ``runs/zoo-<preset>-evogm`` in the working folder."""
    return Path(out).resolve() if out else Path("runs", f"zoo-{preset}-evogm").resolve()


def zoo_search_config(
    out: str | Path | None = None, zoo_dir: str | Path | None = None, preset: str = "tiny", seed: int = 0
) -> SearchConfig:
    """EvoGM on every unseen task of the zoo at once (mean validation score), with the paper's budget:
    P = 2N, 2 rounds x 3 iterations, i.e. 16N evaluations, searching on the first 30 validation examples of
    each task so the quick start takes minutes on 2 CPU cores (the release is scored on every example).

    Raises:
        MergeInputError, ZooError: `check_zoo_arguments`' refusals, before the zoo is built; a zoo that does not
            load; the config's (`load_config`).
    """
    check_zoo_arguments(zoo_dir, preset, seed)
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
        "output_dir": str(zoo_output_dir(out, preset)),
        "intended_use": f"Demonstration: a merge of the offline zoo's '{preset}' experts for its unseen tasks.",
    })
