"""Build an EvoX StdWorkflow for a higher-is-better problem, so nobody forgets the direction."""

from __future__ import annotations

from typing import Any

from evox.core import Algorithm, Monitor, Problem
from evox.workflows import StdWorkflow


def build_workflow(
    algorithm: Algorithm, problem: Problem, monitor: Monitor | None = None, **workflow_kwargs: Any
) -> StdWorkflow:
    """``StdWorkflow(algorithm, problem, monitor, opt_direction="max", ...)``.

    Every evox-merge problem returns higher-is-better fitness while EvoX algorithms minimise; the workflow
    negates fitness before the algorithm and the monitor sees it. Extra keyword arguments go to `StdWorkflow`.
    """
    if "opt_direction" in workflow_kwargs:
        raise TypeError("build_workflow always uses opt_direction='max'; build StdWorkflow yourself to change it")
    return StdWorkflow(algorithm, problem, monitor=monitor, opt_direction="max", **workflow_kwargs)
