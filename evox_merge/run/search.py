"""A search run: validate the config, search with records and checkpoints, then write the release packet.

Output directory::

    run.json          config, task-file hashes and start time (checked on --resume)
    records.jsonl     every evaluated candidate, appended as it is evaluated
    checkpoint.pt     workflow + algorithm + RNG state, rewritten atomically after every generation
    best/adapter/     the best merge as a PEFT LoRA adapter (best/model/ with release.full_model)
    recipe.json       provenance: base, experts, hashes, operator, coefficients, scores, resources, lineage
    README.md         model card; history.csv; fitness.png, coefficients.png, task_scores.png
    run.lock          only while a search runs there: a second search on the folder is refused

The folder's checks, lock and roll-back live in `evox_merge.run.output_dir` (torch-free: the CLI checks the folder
before it imports this module). A search that ends before its first checkpoint (a refused input, an error, Ctrl-C)
leaves the folder as it found it: the files it wrote are removed, those it replaced (``--overwrite``, a failed start)
put back. After that checkpoint the folder holds a run that ``--resume`` continues.

With ``objectives: pareto`` the release is a Pareto packet instead of ``best/`` (`evox_merge.run.pareto_release`):
``champion/`` (chosen as ``best/`` is), ``specialists/<objective>/``, ``challengers/<n>/``, each an ``adapter/`` with
its own recipe.json, a model-card section each, ``pareto_front.png`` and the hypervolume per generation in
history.csv. With ``objectives: mean`` the packet is exactly the one above.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from evox_merge.run.loop import run_generations
from evox_merge.run.registry import (build_algorithm, is_multi_objective, racing_for, start_points,
                                     takes_starting_points)
from evox_merge.util.atomic import write_text_atomic
from evox_merge.run.checkpoint import load_checkpoint, read_checkpoint_counters, save_checkpoint
from evox_merge.run.config import SearchConfig, load_config
from evox_merge.run.distributed import DistributedRunError, init_distributed, single_process
from evox_merge.util.errors import MergeInputError, RunStateError
from evox_merge.experts import ExpertSet
from evox_merge.experts.spaces import build_space
from evox_merge.util.machine import describe_machine
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.normalisation import anchor_normalisation
from evox_merge.problems.static_names import LINEAR_STATIC_MERGES, STATIC_MERGE_NAMES
from evox_merge.problems.subsample import Subsampler, SubsampleSettings
from evox_merge.run.progress import ProgressMode, SearchProgress
from evox_merge.run.evidence import run_evidence
from evox_merge.run.objectives import hypervolume_by_generation, objectives_from_config
from evox_merge.run.output_dir import CHECKPOINT_NAME, RECORDS_NAME, OutputClaim, ctrl_c_ignored, prepare_output
from evox_merge.run.pareto_release import release_pareto
from evox_merge.run.recipe import build_recipe
from evox_merge.run.mergevolve_stage import mergevolve_stage
from evox_merge.run.monitor import RunMonitor, read_records, truncate_records
from evox_merge.run.release import write_merge
from evox_merge.run.report import (
    plot_coefficients, plot_fitness, plot_layer_coefficients, plot_task_scores, write_history_csv, write_model_card,
)
from evox_merge.run.selection import (contest_out_of_bag, release_by_rule, release_rival, score_table,
                                      searched_candidates, select_release, selection_margin, static_candidates)
from evox_merge.tasks import read_task, split_task
from evox_merge.run.workflow import build_workflow

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
        with ctrl_c_ignored():  # a second Ctrl-C must not leave the folder half put back
            if claim is not None:
                claim.rollback()
            if isinstance(error, KeyboardInterrupt):
                kept = claim is None or claim.committed or resume
                raise SearchInterrupted(out, _checkpoint_generation(out) if kept else None,
                                        config.budget.generations_for(config.algorithm.pop_size)) from None
        raise
    finally:
        with ctrl_c_ignored():
            if claim is not None:
                claim.release()
        if config.distributed and dist.is_initialized():
            dist.destroy_process_group()


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
        prepare_output(config, resume, overwrite, write=False)
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
        prepare_output(config, resume, overwrite, evidence=run_evidence(config, experts, device_name, objectives),
                        claim=claim)
    if context.world_size > 1:
        dist.barrier()
    parts = [split_task(read_task(spec), config.selection_fraction, config.max_validation_examples)
             for spec in specs]
    space = build_space(experts.target_names, experts.expert_names, **config.space.options(config.seed))
    problem = MergeProblem(experts, [search for search, _ in parts], batch_size=config.batch_size,
                           batch_tokens=config.batch_tokens, space=space)
    if config.normalise != "none":
        problem.normalise(anchor_normalisation(problem))
    vector = objectives.pareto and is_multi_objective(config.algorithm.name)
    statics, initial, start = _static_start(config, problem, progress == "bar")
    algorithm = build_algorithm(config.algorithm.name, problem.dim, pop_size=config.algorithm.pop_size,
                                lb=config.algorithm.lb, ub=config.algorithm.ub, seed=config.seed,
                                params=config.algorithm.params, n_objs=len(objectives.names) if vector else None,
                                space=space, initial=initial)
    if config.racing is not None:
        problem.race(*racing_for(algorithm, config.racing.confidence, config.racing.stages, config.selection_top_k))
    generations = config.budget.generations_for(config.algorithm.pop_size)
    budget = generations * config.algorithm.pop_size
    subsample = (Subsampler(SubsampleSettings(config.subsample.size, config.subsample.elites, config.seed),
                            problem.task_names, [len(task.records) for task in problem.tasks])
                 if config.subsample is not None else None)  # evox_merge.problems.subsample

    counters = {"generation": 0, "records": 0, "best": -math.inf, "elapsed": 0.0}
    checkpoint_path = out / CHECKPOINT_NAME
    monitor = RunMonitor(problem.task_names, problem.aggregate, experts.expert_names, out / RECORDS_NAME,
                         write=context.is_main,
                         objectives=(lambda scores: objectives.values(problem, scores)) if objectives.pareto else None,
                         objective_names=objectives.names)
    workflow = build_workflow(algorithm, problem, monitor, objectives=objectives if vector else None,
                              device=context.device, enable_distributed=context.world_size > 1, subsample=subsample)
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
    # subsample mode: the contest's searched candidates are the best by estimate, re-scored on the full search part
    pool = subsample.release_pool(problem, config.selection_top_k) if subsample is not None else None
    selection = _select_and_score(config, problem, parts, specs, records if pool is None else pool, progress == "bar", statics)
    evolved = mergevolve_stage(config, problem, selection, out) if config.mergevolve is not None else None
    winner = selection["winner"]
    release_dir = "champion" if objectives.pareto else "best"
    adapter_info = write_merge(experts, winner.merge, out / release_dir, config.release.adapter_rank,
                               full_model=config.release.full_model)

    wall_seconds = elapsed_before + time.perf_counter() - start_time
    recipe = build_recipe(
        config=config, experts=experts, specs=specs, records=records, selection=selection,
        normalisation=problem.normalisation, adapter_info=adapter_info, algorithm=algorithm, space=problem.space,
        start=start,
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
    if subsample is not None:
        recipe["subsample"] = {**subsample.summary(), "release_pool": pool}
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


def _static_start(config: SearchConfig, problem: MergeProblem, show: bool) -> tuple[list | None, Any, dict]:
    """With ``algorithm.start: static``: the static merges tuned on the search part now, before the search (the
    release contest reuses them: nothing is tuned twice), the starting points made of the linear ones
    (`start_points`, best first) and the start's facts for recipe.json; else ``(None, None, facts)``."""
    facts: dict[str, Any] = {"start": config.algorithm.start, "starting_points": []}
    if config.algorithm.start != "static":
        return None, None, facts
    if not takes_starting_points(config.algorithm.name):  # EvoX's multi-objective algorithms, foreign classes
        logging.getLogger(__name__).warning("algorithm.start: static: %s takes no starting points; it starts as it "
                                            "does by default", config.algorithm.name)
        return None, None, {"start": "default", "starting_points": [],
                            "start_note": f"start: static asked; {config.algorithm.name} takes no starting points"}
    contest = config.release.contest()
    names = [name for name in STATIC_MERGE_NAMES if name in contest or name in LINEAR_STATIC_MERGES]
    bar = tqdm(total=len(names), desc="tuning the static merges to start from", unit="merge", disable=not show,
               leave=False)
    statics = static_candidates(problem, names, seed=config.seed, progress=bar)
    bar.close()
    initial, names = start_points(statics, problem.space)
    fitness = {candidate.name: candidate.search_fitness for candidate in statics}
    facts["starting_points"] = [{"name": name, "search_fitness": fitness[name],
                                 "coefficients": row.tolist()} for name, row in zip(names, initial if names else [])]
    return [candidate for candidate in statics if candidate.name in contest], initial, facts


def _select_and_score(config: SearchConfig, problem: MergeProblem, parts, specs, records, show: bool,
                      statics: list | None = None) -> dict:
    """Choose the release on the selection part (`evox_merge.run.selection`) and score it, the best searched
    candidate and the static merges on the search part, the selection part and the test files (`statics`: the
    static merges already tuned on the search part, by `_static_start`)."""
    splits = {"search": problem}
    if config.selection_fraction > 0:
        splits["selection"] = MergeProblem(problem.experts, [sel for _, sel in parts], batch_size=config.batch_size,
                                           batch_tokens=config.batch_tokens,
                                           space=problem.space).normalise(problem.normalisation)
    tested = [spec.with_split("test") for spec in specs if spec.test_path]
    if len(tested) == len(specs):
        splits["test"] = MergeProblem(problem.experts, tested, batch_size=config.batch_size,
                                      batch_tokens=config.batch_tokens,
                                      space=problem.space).normalise(problem.normalisation)
    searched = searched_candidates(records, config.selection_top_k,
                                   space=None if problem.space.kind == "expert" else problem.space)
    static_names = config.release.contest()
    steps = len(static_names) * (statics is None) + (len(searched) + len(static_names) + 2) * ("selection" in splits)
    steps += len(splits) * (2 + len(static_names))
    bar = tqdm(total=steps, desc="selecting and scoring the release", unit="step", disable=not show, leave=False)
    if statics is None:
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
            "candidates": searched + statics, "scores": scores, "splits": splits, "margin": margin,
            "examples": {split: {task.name: len(task.records) for task in part.tasks}
                         for split, part in splits.items()}}


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
