"""The error table's harness: a workspace of copies of the tiny fixture, the CLI as a user runs it, one `Case` per
bad input. `tests/test_errors.py` runs every case of `CORE_CASES` there and of each `tests/error_cases_*.py` module
(``CASES`` in each), and generates docs/errors.md from the messages they got."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors.torch import load_file, save_file

from evox_merge.cli import build_parser
from evox_merge.run.config import load_config
from evox_merge.run.output_dir import prepare_output
from evox_merge.zoo.char_tokenizer import build_char_tokenizer

TASK_NAMES = ("choice", "copy", "text")
TYPES = {"choice": "multiple_choice", "copy": "generation", "text": "language_modeling"}
# Called with no arguments just before each command runs (the test snapshots the workspace there).
BEFORE_COMMAND: list[Callable[[], None]] = []


class Workspace:
    """A folder holding a base, three experts, task files and a search config with relative paths."""

    def __init__(self, root: Path, setup) -> None:
        self.root = root
        shutil.copytree(setup.base_dir, root / "base")
        for index, adapter in enumerate(setup.adapter_dirs[:3]):
            shutil.copytree(adapter, root / f"expert_{index}")
        (root / "data").mkdir()
        for spec in setup.tasks:
            shutil.copy(spec.path, root / "data" / Path(spec.path).name)
            shutil.copy(spec.test_path, root / "data" / Path(spec.test_path).name)

    def task(self, name: str, **overrides) -> dict:
        spec = {"name": name, "type": TYPES[name], "path": f"data/{name}_validation.jsonl",
                "test_path": f"data/{name}_test.jsonl"}
        if name == "copy":
            spec["max_new_tokens"] = 8
        return {**spec, **overrides}

    def config(self, **overrides) -> dict:
        config = {"base": "base", "experts": ["expert_0", "expert_1", "expert_2"],
                  "tasks": [self.task(name) for name in TASK_NAMES],
                  "algorithm": {"name": "random", "pop_size": 4}, "budget": {"generations": 1},
                  "batch_size": 8, "output_dir": "out", "release": {"baselines": False}}
        config.update(overrides)
        return config

    def write_config(self, **overrides) -> Path:
        path = self.root / "search.yaml"
        path.write_text(yaml.safe_dump(self.config(**overrides)))
        return path

    def tasks_file(self) -> Path:
        path = self.root / "data" / "tasks.yaml"
        specs = [self.task(name) for name in TASK_NAMES]  # paths relative to the spec file, in data/
        path.write_text(yaml.safe_dump([{**s, "path": s["path"][5:], "test_path": s["test_path"][5:]} for s in specs]))
        return path

    def line(self, name: str, text: str | bytes, split: str = "validation") -> None:
        """Append one line to a task file."""
        with open(self.root / "data" / f"{name}_{split}.jsonl", "ab") as handle:
            handle.write((text.encode() if isinstance(text, str) else text) + b"\n")

    def edit_tensors(self, expert: str, edit: Callable[[dict], None]) -> None:
        path = self.root / expert / "adapter_model.safetensors"
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path)

    def start_run(self, **overrides) -> Path:
        """A run directory as a started search leaves it (run.json for this config), written without a model."""
        config = load_config(self.write_config(**overrides))
        prepare_output(config, resume=False, overwrite=False)
        return Path(config.output_dir)


def cli(*argv: str) -> None:
    """Run an evox-merge command's handler (main() turns its EvoxMergeError into exit status 2)."""
    args = build_parser().parse_args([str(a) for a in argv])
    for hook in BEFORE_COMMAND:
        hook()
    args.handler(args)


def search(ws: Workspace, *flags: str, **overrides) -> None:
    cli("search", ws.write_config(**overrides), "--quiet", *flags)


def foreign_adapter(root: Path) -> Path:
    """An adapter trained from another base (hidden size 32), its recorded base moved away."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    from tiny_models import tiny_config

    torch.manual_seed(1)
    model = Qwen2ForCausalLM(tiny_config(len(build_char_tokenizer()), hidden_size=32))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = "somewhere/else"
    peft_model.save_pretrained(root / "foreign")
    return root / "foreign"


def dense_expert(ws: Workspace, name: str = "dense_0", edit: Callable[[dict], None] | None = None,
                 config_edit: Callable[[dict], None] | None = None) -> str:
    """A full fine-tune of the workspace's base (the base plus noise) as `name`, optionally with its tensors or its
    config.json edited; returns its folder name for the config."""
    folder = ws.root / name
    shutil.copytree(ws.root / "base", folder)
    tensors = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(7)
    for key in tensors:
        tensors[key] = tensors[key] + 0.01 * torch.randn(tensors[key].shape, generator=generator)
    if edit is not None:
        edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if config_edit is not None:
        config = json.loads((folder / "config.json").read_text())
        config_edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return name


@dataclass(frozen=True)
class Case:
    """One bad input: `make` builds it in a workspace and runs what a user would (expected to raise)."""

    id: str
    input: str
    make: Callable[[Workspace], None]
    error: type
    message: str
    before_model: bool = True


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` by relative path, with its content hash (folders as 'dir')."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        state[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def normalise(message: str, root: Path) -> str:
    message = message.replace(os.environ.get("HF_HUB_CACHE", "<unset>"), "<hub cache>")
    message = re.sub(r"\bpid \d+", "pid <pid>", message)  # a lock holder's process id differs every run
    message = re.sub(r"\b[0-9a-f]{12}\.\.\.", "<sha256>...", message)  # hashes of files written at test time
    return message.replace(str(root.resolve()), "<dir>").replace(str(root), "<dir>")


