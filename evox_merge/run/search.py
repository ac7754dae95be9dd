"""A search run: validate the config, search with records and checkpoints, then write the release packet.

Output directory::

    run.json          config, task-file hashes and start time (checked on --resume)
    records.jsonl     every evaluated candidate, appended as it is evaluated
    checkpoint.pt     workflow + algorithm + RNG state, rewritten atomically after every generation
    best/adapter/     the best merge as a PEFT LoRA adapter (best/model/ with release.full_model)
    recipe.json       provenance: base, experts, hashes, operator, coefficients, scores, resources, lineage
    README.md         model card; history.csv; fitness.png, coefficients.png, task_scores.png
    run.lock          only while a search runs there: a second search on the folder is refused (`OutputClaim`)

A search that ends before its first checkpoint (a refused input, an error, Ctrl-C) leaves the folder as it found it:
the files it wrote are removed, those it replaced (``--overwrite``, a failed start) put back. After that checkpoint
the folder holds a run that ``--resume`` continues.

With ``objectives: pareto`` the release is a Pareto packet instead of ``best/`` (`evox_merge.run.pareto_release`):
``champion/`` (chosen as ``best/`` is), ``specialists/<objective>/``, ``challengers/<n>/``, each an ``adapter/`` with
its own recipe.json, a model-card section each, ``pareto_front.png`` and the hypervolume per generation in
history.csv. With ``objectives: mean`` the packet is exactly the one above.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from evox_merge.run.loop import run_generations
from evox_merge.run.registry import build_algorithm, is_multi_objective, racing_for
from evox_merge.util.atomic import write_text_atomic
from evox_merge.run.checkpoint import CHECKPOINT_NAME, load_checkpoint, read_checkpoint_counters, save_checkpoint
from evox_merge.run.config import SearchConfig, load_config
from evox_merge.run.distributed import DistributedRunError, init_distributed, single_process
from evox_merge.util.errors import MergeInputError, RunStateError
from evox_merge.util.hashing import directory_sha256
from evox_merge.util.hub import resolve_model
from evox_merge.util.lock import FolderBusy, FolderLock
from evox_merge.experts import ExpertSet
from evox_merge.experts.spaces import build_space
from evox_merge.util.machine import describe_machine
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.normalisation import anchor_normalisation
from evox_merge.problems.static_merges import STATIC_MERGES
from evox_merge.run.progress import ProgressMode, SearchProgress
from evox_merge.run.evidence import run_evidence
from evox_merge.run.objectives import hypervolume_by_generation, objectives_from_config
from evox_merge.run.pareto_release import PARETO_FILES, release_pareto
from evox_merge.run.recipe import build_recipe
from evox_merge.run.mergevolve_stage import RECORDS as MERGEVOLVE_RECORDS, mergevolve_stage
from evox_merge.run.monitor import RECORDS_NAME, RunMonitor, read_records, truncate_records
from evox_merge.run.release import write_merge
from evox_merge.run.report import (
    plot_coefficients, plot_fitness, plot_layer_coefficients, plot_task_scores, write_history_csv, write_model_card,
)
from evox_merge.run.selection import (contest_out_of_bag, release_by_rule, release_rival, score_table,
                                      searched_candidates, select_release, selection_margin, static_candidates)
from evox_merge.tasks import read_task, split_task
from evox_merge.run.workflow import build_workflow

logger = logging.getLogger(__name__)
RUN_NAME = "run.json"
LOCK_NAME = "run.lock"
# Hidden folders where the run files a search replaces wait for its first checkpoint (`OutputClaim.set_aside`).
_ASIDE_PREFIX = ".evox-merge-replaced-"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SearchResult:
    """Where a finished run's files are and what it found.

    Attributes:
        best_coefficients, best_fitness: the search's best candidate on the search part (its records).
        release: what was released: ``record:<id>`` (a searched candidate) or a static merge's name.
        release_coefficients: the released merge's coefficients (None for TIES/DARE, which are dense deltas).
        scores: ``scores[merge][split][task | "mean" | "normalised"]`` (merges: release, best_searched and the
            static merges; splits: search, selection, test).
    """

    output_dir: Path
    best_coefficients: list[float]
    best_fitness: float
    release: str
    release_coefficients: list[float] | None
    scores: dict[str, dict[str, dict[str, float]]]
    recipe: dict[str, Any]


def task_file_hashes(config: SearchConfig) -> dict[str, str]:
    """SHA-256 of every task file the config names (validation and test), by path."""
    hashes = {}
    for spec in config.task_specs():
        digests = spec.file_hashes()
        hashes[spec.path] = digests["sha256"]
        if spec.test_path is not None:
            hashes[spec.test_path] = digests["test_sha256"]
    return hashes


# Every name a run writes in its output directory: --overwrite deletes these and nothing else (the lock file, held
# by the search that deletes them, is removed when that search ends).
RUN_FILES = (RUN_NAME, RECORDS_NAME, CHECKPOINT_NAME, LOCK_NAME, "best", "recipe.json", "README.md", "history.csv",
             "fitness.png", "coefficients.png", "task_scores.png", MERGEVOLVE_RECORDS, *PARETO_FILES)


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search, raised once the output folder is in order again.

    Attributes:
        output_dir: the run's folder.
        generation: the generation its last checkpoint reached when the folder holds a run that ``--resume``
            continues (this search's, or on ``--resume`` the one it was continuing); None when this search kept
            nothing and the folder is as it found it.
        generations: the run's budget in generations.
    """

    def __init__(self, output_dir: Path, generation: int | None, generations: int) -> None:
        super().__init__(f"search in {output_dir} interrupted")
        self.output_dir, self.generation, self.generations = output_dir, generation, generations


def _remove(path: Path) -> None:
    """Delete a file, a link or a folder tree (run files only: callers name them from `RUN_FILES`)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


class OutputClaim:
    """One search's hold on its output folder, from before the folder is checked until the search ends.

    `acquire` creates the folder where missing and locks it (``run.lock``, `evox_merge.util.lock`), so a second
    search on the folder is refused while this one runs. Until the search's first checkpoint (`commit`) the run
    files it replaces are set aside rather than deleted (`set_aside`), so that `rollback` can put the folder back
    as `acquire` found it: it removes the run files this search wrote, restores those it set aside and removes the
    folders it created. Only rank 0 of a distributed search holds a claim.
    """

    def __init__(self, out: Path) -> None:
        self.out = out.absolute()
        self.committed = False
        self._lock = FolderLock(self.out / LOCK_NAME)
        self._created: list[Path] = []  # folders this search created, outermost first
        self._before: set[str] = set()  # the run files present when it took the lock
        self._aside: Path | None = None
        self._set_aside: list[str] = []

    def acquire(self) -> None:
        """Create the output folder where missing and take its lock, before anything is checked or written.

        Raises:
            MergeInputError: output_dir is a file, lies under a file, or cannot be created or written.
            RunStateError: another search holds the folder (named with its pid).
        """
        out = self.out
        if out.exists() and not out.is_dir():
            raise MergeInputError(f"output_dir: {out} is a file; expected a directory (new, empty, or a previous "
                                  "run's)")
        missing = [folder for folder in (out, *out.parents) if not folder.exists()]
        blocker = next(folder for folder in out.parents if folder.exists())
        if not blocker.is_dir():
            raise MergeInputError(f"output_dir: {out} lies under {blocker}, which is a file; expected a folder "
                                  "that can be created")
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._created.append(folder)
            self._lock.acquire()
        except FolderBusy as busy:
            raise RunStateError(f"output_dir: {out} is in use by another search (pid {busy.holder} holds "
                                f"{busy.path}); wait for it to end, or choose another output_dir") from None
        except OSError as error:
            raise MergeInputError(f"output_dir: cannot create or write {out} ({error.strerror or error}: "
                                  f"{error.filename}); expected a folder that can be created and written") from None
        self._before = {name for name in RUN_FILES if _present(out / name)}

    def set_aside(self, name: str, copy: bool = False) -> None:
        """The search is about to delete (or, with `copy`, change in place) the run file `name`: move (copy) it into
        a hidden folder where it waits for `commit` (deleted) or `rollback` (put back)."""
        path = self.out / name
        if not _present(path) or name in self._set_aside:  # nothing to keep, or its original is safe already
            if not copy:
                _remove(path)
            return
        if self._aside is None:
            self._aside = Path(tempfile.mkdtemp(dir=self.out, prefix=_ASIDE_PREFIX))
        if copy:
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, self._aside / name)
        else:
            os.rename(path, self._aside / name)
        self._set_aside.append(name)

    def commit(self) -> None:
        """The search wrote its first checkpoint: what it set aside (and what a killed search left aside) goes."""
        if self.committed:
            return
        self.committed = True
        for folder in self.out.glob(f"{_ASIDE_PREFIX}*"):
            shutil.rmtree(folder, ignore_errors=True)

    def rollback(self) -> None:
        """Before `commit`: put the output folder back as `acquire` found it (after it, nothing to undo)."""
        if self.committed:
            return
        if self._lock.held:
            for name in RUN_FILES:
                if name != LOCK_NAME and (name not in self._before or name in self._set_aside):
                    _remove(self.out / name)
            for name in self._set_aside:
                os.rename(self._aside / name, self.out / name)
            if self._aside is not None:
                self._aside.rmdir()
            self._lock.release(remove=False)
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:  # someone put a file there meanwhile: it stays, with its folder
                break

    def release(self) -> None:
        """The search ended: remove the lock file (a no-op after `rollback`)."""
        self._lock.release(remove=True)


def _config_inputs(config: SearchConfig) -> list[Path]:
    """The local files and folders the config reads (Hub ids live in the Hub cache, outside any run)."""
    paths = [config.base, *config.experts, *([config.tokenizer] if config.tokenizer else [])]
    for spec in config.tasks if isinstance(config.tasks, list) else []:
        paths += [spec.get("path"), spec.get("test_path")]
    return [Path(p).resolve() for p in paths if p and Path(p).is_absolute()]


def _check_resumable(out: Path) -> None:
    """Before any model loads: the checkpoint is readable and records.jsonl holds every record it covers, each a
    readable record."""
    if not (out / CHECKPOINT_NAME).exists():
        return
    covered = read_checkpoint_counters(out / CHECKPOINT_NAME)["records"]
    records = out / RECORDS_NAME
    try:
        complete = len(read_records(records, limit=covered)) if records.is_file() else 0
    except RunStateError as error:
        raise RunStateError(f"{error}, so the run cannot be continued exactly; start again with --overwrite") from None
    if complete < covered:
        raise RunStateError(f"{records} holds {complete} complete records but {out / CHECKPOINT_NAME} covers "
                            f"{covered}: records were lost, so the run cannot be continued exactly; start again "
                            "with --overwrite")


def _check_models_unchanged(config: SearchConfig, run: dict[str, Any], out: Path) -> None:
    """Before any model loads, on --resume: the base and the experts hash as run.json's evidence recorded them
    (`ExpertSet.base_hash` and ``metadata``: `directory_sha256` of each model's folder). A run from before evidence
    was recorded has nothing to compare.

    Raises:
        MergeInputError: naming the first model folder whose files changed since the run started.
    """
    evidence = run.get("evidence")
    if not isinstance(evidence, dict):
        return
    recorded = [("base", config.base, (evidence.get("base_family") or {}).get("base_sha256"))]
    recorded += [(f"experts[{index}]", ref, expert.get("sha256"))
                 for index, (ref, expert) in enumerate(zip(config.experts, evidence.get("experts") or []))]
    for what, ref, digest in recorded:
        folder = resolve_model(ref, what).path
        if digest and directory_sha256(folder) != digest:
            raise MergeInputError(f"--resume refused: {what} {folder} changed since the run started (its files' "
                                  f"sha256 differs from the one {out / RUN_NAME} recorded), so the run cannot be "
                                  "continued exactly; start a new run with --overwrite")


def _prepare_output(config: SearchConfig, resume: bool, overwrite: bool, write: bool = True,
                    evidence: dict[str, Any] | None = None, claim: OutputClaim | None = None) -> dict[str, Any]:
    """Check, then (with `write`) clear the output directory and write run.json; return the run's metadata (saved
    or new). With ``write=False`` only the checks run, so a refusal comes before anything loads.

    A directory holding only a failed start (run.json, perhaps records.jsonl, no checkpoint) is started afresh,
    with or without --resume; a lock file alone (``run.lock``, left by a killed search) is an empty directory.
    --overwrite deletes only the files a run writes (`RUN_FILES`), only where run.json shows a previous run, and
    never a file or folder the config reads. `evidence` (the run-constant evidence fields,
    `evox_merge.run.evidence.run_evidence`) is written into a new run.json. With the search's `claim` on the folder
    the files it replaces are set aside until its first checkpoint (`OutputClaim.set_aside`), not deleted.
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise MergeInputError(f"output_dir: {out} is a file; expected a directory (new, empty, or a previous run's)")
    hashes = task_file_hashes(config)
    entries = sorted(p.name for p in out.iterdir()
                     if not p.name.startswith(".") and p.name != LOCK_NAME) if out.is_dir() else []
    failed_start = bool(entries) and set(entries) <= {RUN_NAME, RECORDS_NAME} and RUN_NAME in entries
    if resume:
        if not (out / RUN_NAME).is_file():
            raise MergeInputError(f"--resume: {out} holds no run to resume ({RUN_NAME} missing)")
        try:
            run = json.loads((out / RUN_NAME).read_text(encoding="utf-8"))
            saved_config, saved_hashes = run["config"], run["task_hashes"]
        except (ValueError, KeyError, TypeError) as error:
            raise RunStateError(f"{out / RUN_NAME}: not a readable run description ({error}); start again with "
                                "--overwrite") from None
        if not failed_start:
            _check_resumable(out)
            current = config.model_dump(mode="json")
            saved_config = {"objectives": "mean", **saved_config}  # runs from before objectives existed
            if saved_config != current:
                changed = sorted(k for k in {*saved_config, *current} if saved_config.get(k) != current.get(k))
                raise MergeInputError(f"--resume: the config differs from the run's in {changed}")
            changed_files = sorted(path for path, digest in saved_hashes.items() if hashes.get(path) != digest)
            if changed_files:
                raise MergeInputError(
                    f"--resume refused: task file(s) changed since the run started: {changed_files}; "
                    "start a new run (--overwrite) to search on the new data"
                )
            _check_models_unchanged(config, run, out)
            return run
        logger.info("%s: the previous start failed before its first checkpoint; starting afresh", out)
    elif entries and not failed_start:
        if not overwrite:
            raise MergeInputError(
                f"output directory {out} is not empty: pass --resume to continue its run or --overwrite to replace it"
            )
        if not (out / RUN_NAME).is_file():
            raise MergeInputError(
                f"--overwrite refused: {out} holds no previous run ({RUN_NAME} missing) but {len(entries)} other "
                f"entr{'y' if len(entries) == 1 else 'ies'} (e.g. {entries[:3]}); evox-merge deletes only its own "
                "runs: choose a new or empty output_dir"
            )
        owned = [(out / name).resolve() for name in RUN_FILES]
        inside = sorted(str(p) for p in _config_inputs(config) for o in owned if p == o or o in p.parents)
        if inside:
            raise MergeInputError(f"--overwrite refused: the config reads {inside}, inside the previous run in "
                                  f"{out} that --overwrite would delete; copy them elsewhere first")
    if not write:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:  # a failed start's files, or (--overwrite) a previous run's
        if name != LOCK_NAME:
            if claim is not None:
                claim.set_aside(name)
            else:
                _remove(out / name)
    run = {"config": config.model_dump(mode="json"), "task_hashes": hashes, "started": time.time(),
           **({"evidence": evidence} if evidence is not None else {})}
    write_text_atomic(out / RUN_NAME, json.dumps(run, indent=2))
    return run


def run_search(
    config: SearchConfig | dict | str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressMode = "bar",
) -> SearchResult | None:
    """Run one search end to end and write its release packet (see the module docstring for the files).

    Args:
        config: a `SearchConfig`, a dict, or a YAML path (validated before anything loads).
        resume: continue the run in ``output_dir`` from its last checkpoint (same config, unchanged task files).
        overwrite: replace a non-empty ``output_dir``.
        progress: ``bar`` (tqdm), ``json`` (one JSON line per generation on stdout) or ``quiet``.

    With ``distributed: true`` under torchrun, every rank evaluates its share of each population; rank 0 writes
    every file and returns the result, the other ranks return None.

    The output folder is locked for the whole search (rank 0 holds the lock), and a search that ends before its
    first checkpoint, whatever ends it, leaves the folder as it found it (`OutputClaim`).

    Raises:
        MergeInputError, TaskFormatError, RunStateError: a refused input or output folder (another search holding
            it among them).
        SearchInterrupted: Ctrl-C; it says whether the folder keeps a run that ``--resume`` continues.
    """
    if not isinstance(config, SearchConfig):
        config = load_config(config)
    if resume and overwrite:
        raise MergeInputError("--resume and --overwrite exclude each other")
    context = init_distributed(config.device, config.collective_timeout_s) if config.distributed else (
        single_process(config.device))
    out = Path(config.output_dir)
    claim = OutputClaim(out) if context.is_main else None
    try:
        if claim is not None:
            claim.acquire()
        return _run(config, context, resume, overwrite, progress, claim)
    except BaseException as error:
        with _ctrl_c_ignored():  # a second Ctrl-C must not leave the folder half put back
            if claim is not None:
                claim.rollback()
            if isinstance(error, KeyboardInterrupt):
                kept = claim is None or claim.committed or resume
                raise SearchInterrupted(out, _checkpoint_generation(out) if kept else None,
                                        config.budget.generations_for(config.algorithm.pop_size)) from None
        raise
    finally:
        with _ctrl_c_ignored():
            if claim is not None:
                claim.release()
        if config.distributed and dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def _ctrl_c_ignored() -> Iterator[None]:
    """Ignore SIGINT in the block (only the main thread can, and only where Python set its handler; elsewhere the
    block runs as it is)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _checkpoint_generation(out: Path) -> int | None:
    """The generation the checkpoint in `out` reached (None: no readable checkpoint)."""
    if not (out / CHECKPOINT_NAME).is_file():
        return None
    try:
        return read_checkpoint_counters(out / CHECKPOINT_NAME)["generation"]
    except RunStateError:
        return None


def _run(config: SearchConfig, context, resume: bool, overwrite: bool, progress: ProgressMode,
         claim: OutputClaim | None) -> SearchResult | None:
    # Refuse a bad output directory, then load and check the model and experts, and only then write run.json; until
    # the first checkpoint `claim` can put the folder back as it was.
    if context.is_main:
        _prepare_output(config, resume, overwrite, write=False)
    out = Path(config.output_dir)
    start_time = time.perf_counter()
    specs = config.task_specs()
    experts = ExpertSet.load(config.base, config.experts, tokenizer=config.tokenizer, device=context.device,
                             dtype=DTYPES[config.dtype], progress=progress == "bar", task_specs=specs,
                             **config.dense.options())
    device_name = (torch.cuda.get_device_name(0) if config.device.startswith("cuda")
                   else describe_machine()["cpu"])
    objectives = objectives_from_config(config.objectives, [spec.name for spec in specs])
    if context.is_main:
        _prepare_output(config, resume, overwrite, evidence=run_evidence(config, experts, device_name, objectives),
                        claim=claim)
    if context.world_size > 1:
        dist.barrier()
    parts = [split_task(read_task(spec), config.selection_fraction, config.max_validation_examples)
             for spec in specs]
    space = build_space(experts.target_names, experts.expert_names, **config.space.options(config.seed))
    problem = MergeProblem(experts, [search for search, _ in parts], batch_size=config.batch_size, space=space)
    if config.normalise != "none":
        problem.normalise(anchor_normalisation(problem))
    vector = objectives.pareto and is_multi_objective(config.algorithm.name)
    algorithm = build_algorithm(config.algorithm.name, problem.dim, pop_size=config.algorithm.pop_size,
                                lb=config.algorithm.lb, ub=config.algorithm.ub, seed=config.seed,
                                params=config.algorithm.params, n_objs=len(objectives.names) if vector else None,
                                space=space)
    if config.racing is not None:
        problem.race(*racing_for(algorithm, config.racing.confidence, config.racing.stages, config.selection_top_k))
    generations = config.budget.generations_for(config.algorithm.pop_size)
    budget = generations * config.algorithm.pop_size

    counters = {"generation": 0, "records": 0, "best": -math.inf, "elapsed": 0.0}
    checkpoint_path = out / CHECKPOINT_NAME
    monitor = RunMonitor(problem.task_names, problem.aggregate, experts.expert_names, out / RECORDS_NAME,
                         write=context.is_main,
                         objectives=(lambda scores: objectives.values(problem, scores)) if objectives.pareto else None,
                         objective_names=objectives.names)
    workflow = build_workflow(algorithm, problem, monitor, objectives=objectives if vector else None,
                              device=context.device, enable_distributed=context.world_size > 1)
    if resume and checkpoint_path.exists():
        counters = load_checkpoint(checkpoint_path, workflow)
        monitor.restart(counters["records"], counters["generation"], counters["best"])
    if claim is not None:
        claim.set_aside(RECORDS_NAME, copy=True)  # resuming: its records beyond the checkpoint are dropped
        truncate_records(out / RECORDS_NAME, counters["records"])
        if problem.racing_state is not None and counters["records"]:  # racing thresholds from the records kept
            problem.racing_state.restore(read_records(out / RECORDS_NAME))
        monitor.progress = SearchProgress(budget, progress, done=counters["records"])
    elapsed_before = counters["elapsed"]

    def checkpoint(done: int) -> None:
        if claim is not None:
            save_checkpoint(checkpoint_path, workflow, {
                "generation": done, "records": monitor.count, "best": monitor.best,
                "elapsed": elapsed_before + time.perf_counter() - start_time})
            claim.commit()

    try:
        run_generations(workflow, monitor, counters["generation"], generations, after_generation=checkpoint)
    except (RuntimeError, dist.DistBackendError) as error:
        if context.world_size == 1 or isinstance(error, torch.OutOfMemoryError):
            raise
        kept = (f"The last checkpoint covers {monitor.generation} generation(s) in {out}; relaunch with --resume"
                if monitor.generation else f"No checkpoint was written, so {out} is as it was; relaunch the search")
        raise DistributedRunError(
            f"rank {context.rank}: a collective failed in generation {monitor.generation} (a rank died or timed "
            f"out: {str(error).splitlines()[0]}). {kept}"
        ) from error
    finally:
        if monitor.progress is not None:
            monitor.progress.close()
    if claim is not None:
        claim.commit()  # a resumed run whose search had finished writes no checkpoint
    if not context.is_main:
        return None

    records = read_records(out / RECORDS_NAME)
    if not any(r["fitness"] is not None for r in records):
        raise MergeInputError("every candidate scored NaN: nothing to release (see records.jsonl)")
    selection = _select_and_score(config, problem, parts, specs, records, progress == "bar")
    evolved = mergevolve_stage(config, problem, selection, out) if config.mergevolve is not None else None
    winner = selection["winner"]
    release_dir = "champion" if objectives.pareto else "best"
    adapter_info = write_merge(experts, winner.merge, out / release_dir, config.release.adapter_rank,
                               full_model=config.release.full_model)

    wall_seconds = elapsed_before + time.perf_counter() - start_time
    recipe = build_recipe(
        config=config, experts=experts, specs=specs, records=records, selection=selection,
        normalisation=problem.normalisation, adapter_info=adapter_info, algorithm=algorithm, space=problem.space,
        resources={
            "device": device_name,
            "wall_seconds": wall_seconds,
            "evaluations": len(records),
            "peak_memory_mb": _peak_memory_mb(config.device),
            "seconds_per_candidate": sum(r["seconds"] for r in records) / len(records),
        },
    )
    if evolved is not None:
        recipe["mergevolve"] = evolved
    scores = selection["scores"]
    volumes = None
    if objectives.pareto:
        recipe["release_files"].update(adapter=f"{release_dir}/adapter",
                                       full_model=f"{release_dir}/model" if config.release.full_model else None)
        recipe["pareto"] = release_pareto(config, problem, selection["splits"], records, objectives, selection,
                                          recipe, out)
        volumes = hypervolume_by_generation(records, objectives.names)
    write_text_atomic(out / "recipe.json", json.dumps(recipe, indent=2))
    if objectives.pareto:  # the champion's own copy, like every member's
        write_text_atomic(out / release_dir / "recipe.json", json.dumps(recipe, indent=2))
    write_model_card(recipe, out / "README.md")
    write_history_csv(records, problem.space.names, out / "history.csv", volumes)
    plot_fitness(records, out / "fitness.png")
    if problem.space.kind == "layer":
        best = max((r for r in records if r["fitness"] is not None), key=lambda r: r["fitness"])
        plot_layer_coefficients(best["coefficients"], list(problem.space.group_names), experts.expert_names,
                                out / "coefficients.png",
                                f"best searched candidate (record {best['id']}), by layer group")
    else:
        plot_coefficients(records, experts.expert_names, out / "coefficients.png")
    split = next(s for s in ("test", "selection", "search") if s in scores["release"])
    plot_task_scores({merge: s[split] for merge, s in scores.items()}, out / "task_scores.png",
                     f"{split} scores: the release against the static merges")
    coefficients = winner.merge.coefficients.tolist() if winner.merge.coefficients is not None else None
    best = max((r for r in records if r["fitness"] is not None), key=lambda r: r["fitness"])
    return SearchResult(out, best["coefficients"], best["fitness"], winner.name, coefficients, scores, recipe)


def _select_and_score(config: SearchConfig, problem: MergeProblem, parts, specs, records, show: bool) -> dict:
    """Choose the release on the selection part (`evox_merge.run.selection`) and score it, the best searched
    candidate and the static merges on the search part, the selection part and the test files."""
    splits = {"search": problem}
    if config.selection_fraction > 0:
        splits["selection"] = MergeProblem(problem.experts, [sel for _, sel in parts], batch_size=config.batch_size,
                                           space=problem.space).normalise(problem.normalisation)
    tested = [spec.with_split("test") for spec in specs if spec.test_path]
    if len(tested) == len(specs):
        splits["test"] = MergeProblem(problem.experts, tested, batch_size=config.batch_size,
                                      space=problem.space).normalise(problem.normalisation)
    searched = searched_candidates(records, config.selection_top_k,
                                   space=None if problem.space.kind == "expert" else problem.space)
    static_names = list(STATIC_MERGES) if config.release.baselines else []
    steps = len(static_names) + (len(searched) + len(static_names) + 2) * ("selection" in splits)
    steps += len(splits) * (2 + len(static_names))
    bar = tqdm(total=steps, desc="selecting and scoring the release", unit="step", disable=not show, leave=False)
    statics = static_candidates(problem, static_names, seed=config.seed, progress=bar)
    selection_problem = splits.get("selection")
    contest_winner = select_release(searched + statics, selection_problem, progress=bar)
    best_searched = select_release(searched, selection_problem)  # reuses the scores of the contest above
    margin, winner = None, contest_winner
    if selection_problem is not None:  # how clearly it won: a paired bootstrap against the other kind's best
        bar.set_postfix_str("selection margin of the release")
        rival = release_rival(contest_winner, searched + statics)
        margin = selection_margin(contest_winner, rival, selection_problem, seed=config.seed)
        if margin is not None:  # what the contest is expected to gain on new examples (no winner's curse)
            margin["out_of_bag"] = contest_out_of_bag(searched + statics, selection_problem, seed=config.seed)
        winner = release_by_rule(config.release.rule, contest_winner, rival, margin)
        bar.update(2)
    merges = {"release": winner.merge, "best_searched": best_searched.merge,
              **{candidate.name: candidate.merge for candidate in statics}}
    scores = score_table(merges, splits, progress=bar)
    bar.close()
    return {"winner": winner, "contest_winner": contest_winner, "best_searched": best_searched,
            "candidates": searched + statics, "scores": scores, "splits": splits, "margin": margin}


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
