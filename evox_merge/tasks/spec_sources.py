"""Task specs from where users write them: a mapping (a config's ``tasks`` list), a spec file (YAML or JSON), or a
mapping naming an lm-evaluation-harness task or group (`evox_merge.tasks.lm_eval_tasks`, imported only then: the
harness is an optional extra). Plain specs are built by `evox_merge.tasks.spec.plain_spec_from_dict`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evox_merge.tasks.spec import TaskSpec, check_task_specs, plain_spec_from_dict
from evox_merge.util.errors import TaskFormatError
from evox_merge.util.yaml_file import read_yaml


def task_specs_from_dict(data: dict[str, Any], base_dir: str | Path | None = None,
                         where: str = "task") -> list[TaskSpec]:
    """The specs a mapping stands for: one, or one per task of an lm-evaluation-harness group
    (`evox_merge.tasks.lm_eval_tasks.harness_specs`)."""
    if isinstance(data, dict) and isinstance(data.get("lm_eval"), str):
        from evox_merge.tasks.lm_eval_tasks import harness_specs

        return harness_specs(data, base_dir, where)
    return [task_spec_from_dict(data, base_dir, where)]


def task_spec_from_dict(data: dict[str, Any], base_dir: str | Path | None = None, where: str = "task") -> TaskSpec:
    """Build a `TaskSpec` from a mapping; relative paths are resolved against `base_dir` (a harness group:
    `task_specs_from_dict`)."""
    if not isinstance(data, dict):
        raise TaskFormatError(f"{where}: expected a mapping of task fields, got {type(data).__name__}")
    if isinstance(data.get("lm_eval"), str):  # an lm-evaluation-harness task by name: built into JSONL files here
        from evox_merge.tasks.lm_eval_tasks import harness_spec

        return harness_spec(data, base_dir, where)
    return plain_spec_from_dict(data, base_dir, where)


def load_task_specs(path: str | Path) -> list[TaskSpec]:
    """Read a YAML or JSON file holding a list of task specs (or ``{"tasks": [...]}``)."""
    path = Path(path)
    if not path.is_file():
        raise TaskFormatError(f"task spec file {path} does not exist")
    data = read_yaml(path, TaskFormatError, "YAML/JSON")
    if isinstance(data, dict):
        data = data.get("tasks")
    if not isinstance(data, list) or not data:
        raise TaskFormatError(f"{path}: expected a non-empty list of task specs (or a 'tasks' key holding one)")
    specs = [spec for i, item in enumerate(data) for spec in task_specs_from_dict(item, path.parent,
                                                                                  f"{path} task #{i}")]
    check_task_specs(specs, str(path))
    return specs
