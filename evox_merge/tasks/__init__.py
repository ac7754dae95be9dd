"""Tasks and scorers: task specs and JSONL files, tokenised batches, and the scorers that score a model as it is
(multiple choice by log-likelihood, greedy generation by exact match, language modelling by NLL)."""

from evox_merge.tasks.spec import Task, TaskSpec, read_task, split_task
from evox_merge.tasks.spec_sources import load_task_specs, task_spec_from_dict, task_specs_from_dict

__all__ = ["Task", "TaskSpec", "load_task_specs", "read_task", "split_task", "task_spec_from_dict",
           "task_specs_from_dict"]
