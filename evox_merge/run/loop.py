"""The one generation loop: how every search in evox-merge (a CLI run, a Python run, a sweep cell) advances.

Generation 0 is the workflow's ``init_step`` and every later one a ``step``; each evaluates one population. After
each step the monitor's records are flushed with the algorithm's candidate annotations (the
`evox_merge.algorithms.common.CandidateAnnotations` protocol) and `after_generation` runs (the CLI run saves its
checkpoint there). In subsample mode (a workflow with a ``subsample``) the loop tells the subsampler which
generation is next, so that generation g is scored on its own subset (`evox_merge.problems.subsample`), and the
records carry the subset and the estimates.
"""

from __future__ import annotations

from typing import Callable

from evox.core import Algorithm, Problem

from evox_merge.algorithms.common import CandidateAnnotations
from evox_merge.run.monitor import RunMonitor
from evox_merge.run.workflow import MergeWorkflow, build_workflow


def run_generations(
    workflow: MergeWorkflow,
    monitor: RunMonitor,
    start: int,
    stop: int,
    after_generation: Callable[[int], None] | None = None,
) -> None:
    """Run generations ``start .. stop - 1`` of `workflow` (whose monitor is `monitor`).

    Args:
        after_generation: called with the number of generations done after each one.
    """
    subsample = getattr(workflow, "subsample", None)
    for generation in range(start, stop):
        if subsample is not None:
            subsample.begin(generation)
        workflow.init_step() if generation == 0 else workflow.step()
        algorithm = workflow.algorithm
        annotations = algorithm.candidate_annotations() if isinstance(algorithm, CandidateAnnotations) else {}
        if getattr(workflow.problem, "racing", None) is not None:  # how many examples each candidate was scored on
            annotations = {**annotations, **workflow.problem.candidate_annotations()}
        if subsample is not None:  # the subset, its score there, and the estimate the algorithm got as fitness
            annotations = {**annotations, **subsample.annotations()}
        monitor.flush(annotations)
        if after_generation is not None:
            after_generation(generation + 1)


def search(algorithm: Algorithm, problem: Problem, generations: int, objectives=None,
           objective_fitness: bool = False, subsample=None) -> RunMonitor:
    """Search in memory, no files: `generations` generations of `algorithm` on `problem`; returns the monitor
    with every record (with per-task scores when `problem` is a `MergeProblem`).

    `objectives` (an `evox_merge.run.objectives.Objectives`, pareto) adds each record's objective values; with
    `objective_fitness` the algorithm (a multi-objective one) gets the ``(P, M)`` objective matrix as fitness.
    `subsample` (an `evox_merge.problems.subsample.Subsampler` for `problem`'s tasks): subsample mode.
    """
    pareto = objectives is not None and objectives.pareto
    monitor = RunMonitor(getattr(problem, "task_names", []), getattr(problem, "aggregate", None),
                         getattr(getattr(problem, "experts", None), "expert_names", []),
                         objectives=(lambda scores: objectives.values(problem, scores)) if pareto else None,
                         objective_names=objectives.names if pareto else ())
    workflow = build_workflow(algorithm, problem, monitor, objectives=objectives if objective_fitness else None,
                              subsample=subsample)
    run_generations(workflow, monitor, 0, generations)
    return monitor
