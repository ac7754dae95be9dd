"""Open a built zoo: check it against its manifest and hand out its paths and task specs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evox_merge.util.errors import TaskFormatError, ZooError
from evox_merge.tasks import TaskSpec, load_task_specs
from evox_merge.zoo.manifest import read_manifest, rebuild_command, verify_files

SEEN_TASKS_FILE = "tasks_seen.json"
UNSEEN_TASKS_FILE = "tasks_unseen.json"
ALL_TASKS_FILE = "tasks.json"


@dataclass(frozen=True)
class Zoo:
    """A built, verified zoo.

    Attributes:
        root: the zoo directory.
        base_dir: the base model (a Hugging Face model directory; the tokenizer is saved in it too).
        tokenizer_dir: the tokenizer directory (the same as `base_dir`).
        expert_names: one per expert, the family it was trained on, in the canonical order.
        adapter_dirs: the PEFT LoRA adapter directories, in the order of `expert_names`.
        seen_tasks: one task per expert, its own family (``path`` = validation split, ``test_path`` = test).
        unseen_tasks: held-out tasks no expert was trained on.
        manifest: the parsed ``manifest.json`` (settings, file hashes, build-time validation scores).
    """

    root: Path
    base_dir: Path
    tokenizer_dir: Path
    expert_names: list[str]
    adapter_dirs: list[Path]
    seen_tasks: list[TaskSpec]
    unseen_tasks: list[TaskSpec]
    manifest: dict[str, Any] = field(repr=False)

    @property
    def tasks(self) -> list[TaskSpec]:
        """Seen then unseen tasks."""
        return [*self.seen_tasks, *self.unseen_tasks]

    @property
    def preset(self) -> str:
        return self.manifest["preset"]

    @property
    def seed(self) -> int:
        return self.manifest["seed"]

    def task_families(self, name: str) -> list[str]:
        """The families whose skills task `name` needs (its expert's family for a seen task)."""
        return list(self.manifest["tasks"][name]["families"])


def load_zoo(root: str | Path, *, verify: bool = True) -> Zoo:
    """Open the zoo at `root`.

    Args:
        root: a directory written by `build_zoo`.
        verify: re-hash every file against the manifest (a fraction of a second for `tiny`).

    Raises:
        ZooError: the directory, its manifest or a file is missing or corrupted; the message names the file and
            the ``evox-merge zoo build`` command that rebuilds it.
    """
    root = Path(root)
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    command = rebuild_command(root, manifest.get("preset"), manifest.get("seed"))
    try:
        seen = load_task_specs(root / SEEN_TASKS_FILE)
        unseen = load_task_specs(root / UNSEEN_TASKS_FILE)
    except TaskFormatError as error:
        raise ZooError(f"{error}; rebuild the zoo with: {command}") from error
    names = list(manifest["experts"])
    return Zoo(
        root=root,
        base_dir=root / "base",
        tokenizer_dir=root / "base",
        expert_names=names,
        adapter_dirs=[root / "experts" / name for name in names],
        seen_tasks=seen,
        unseen_tasks=unseen,
        manifest=manifest,
    )
