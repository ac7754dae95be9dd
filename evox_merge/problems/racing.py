"""Racing: stop scoring a candidate once it confidently cannot reach the candidates a search will use.

A search uses the exact fitness of only some of its candidates: CMA-ES recombines the best mu of each population,
EvoGM trains its generators on the best ``winner_ratio`` share of the round's archive and carries the round's best
P into the next, every search's release is chosen among the run's best ``selection_top_k`` candidates
(`evox_merge.run.selection`). The rest need only be known to be worse. With racing on, `MergeProblem` scores a
population in stages (by default the first 25%, then 50%, then all of each task's examples, in file order), and
after each stage drops every candidate whose upper confidence bound is below **both**

* the algorithm's threshold: the fitness a candidate must be able to reach to be used, given the population's
  lower bounds (`evox_merge.algorithms.common.RacingQuota.racing_threshold`: CMA-ES the mu-th best lower bound,
  EvoGM the m-th best of its round archive and the lower bounds, random search none), and
* the release pool's: the ``top_k``-th best of the run's exact fitnesses so far together with this population's
  lower bounds.

A dropped candidate's fitness (and per-task scores) is its estimate on the examples scored so far; its record
says how many examples that was (``examples_scored`` against ``examples_total``). Survivors of the last stage have
exactly the plain path's scores (up to the summation order of float64 sums).

The bound: per task, the mean of the scored examples' values (accuracy 0/1; for language modelling, per-token
log-likelihood weighted by token counts) with a standard error from their sample variance and the finite-population
correction ``1 - n / N`` (zero once every example is scored), widened by Student's t over the normal quantile for a
variance estimated from n examples (no drop before two examples per task); for 0/1 metrics the variance is at least the
Bernoulli variance of the add-one smoothed mean, so a stage where every example agreed is not taken as certain.
Tasks combine through the problem's normalisation and weights; the bound is ``estimate +- z * se`` with ``z`` the
one-sided normal quantile of `confidence`. The decision depends only on the scores and the run's past exact
fitnesses, so racing is deterministic, and a resumed run restores those fitnesses from its records
(`RacingState.restore`).

PSO compares each particle with its own best and so uses every candidate's fitness: racing refuses it, as it refuses
multi-objective fitness and several candidates per pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Callable, Sequence

import torch

from evox_merge.util.errors import MergeInputError


@dataclass(frozen=True)
class Racing:
    """Racing settings (see the module docstring).

    Attributes:
        top_k: how many of the run's best candidates the release selection looks at.
        confidence: one-sided confidence of each drop decision.
        stages: cumulative fractions of each task's examples after which candidates may be dropped (ending at 1).
    """

    top_k: int = 5
    confidence: float = 0.95
    stages: tuple[float, ...] = (0.25, 0.5, 1.0)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise MergeInputError(f"racing top_k must be >= 1, got {self.top_k}")
        if not 0.5 < self.confidence < 1:
            raise MergeInputError(f"racing confidence must be in (0.5, 1), got {self.confidence}")
        stages = tuple(float(s) for s in self.stages)
        if not stages or stages[-1] != 1.0 or any(not a < b for a, b in zip((0.0, *stages), stages)):
            raise MergeInputError(f"racing stages must increase within (0, 1] and end at 1, got {list(self.stages)}")
        object.__setattr__(self, "stages", stages)

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf(self.confidence)

    def stage_ends(self, examples: int) -> list[int]:
        """Cumulative example counts at the end of each stage for a task of `examples` examples (distinct,
        increasing, the last = `examples`)."""
        ends = sorted({max(1, math.ceil(fraction * examples)) for fraction in self.stages} | {examples})
        return [end for end in ends if end <= examples]


@dataclass
class RacingState:
    """The run's best exact fitnesses so far (at most ``top_k``), the release pool's threshold."""

    top_k: int
    best: list[float] = field(default_factory=list)

    def add(self, fitness: Sequence[float]) -> None:
        self.best = sorted([*self.best, *(f for f in fitness if math.isfinite(f))], reverse=True)[: self.top_k]

    def restore(self, records: Sequence[dict]) -> None:
        """Rebuild from a run's records: the fitness of every record scored on all its examples."""
        self.best = []
        self.add([r["fitness"] for r in records if r.get("fitness") is not None
                  and r.get("examples_scored", r.get("examples_total")) == r.get("examples_total")])


def t_over_z(z: float, dof: int) -> float:
    """Student's t quantile over the normal one at the same level (Cornish-Fisher expansion in 1/dof), the
    factor that widens a standard error estimated from few examples; inf below 2 degrees of freedom."""
    if dof < 2:
        return math.inf
    t = z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2) \
        + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * dof ** 3)
    return t / z


def task_estimates(numerators: list[torch.Tensor], denominators: list[torch.Tensor], totals: Sequence[int],
                   binary: Sequence[bool], z: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task, the score estimate from the examples scored so far and its standard error (with `z`, widened by
    Student's t over the normal quantile for the variance estimated from n examples, `t_over_z`).

    Args:
        numerators, denominators: per task, the scored examples' parts (`example_parts` of the scorers).
        totals: per task, how many examples the task has.
        binary: per task, whether its per-example values are 0/1 (accuracy).

    Returns:
        ``(K,)`` estimates and ``(K,)`` standard errors, float64 (NaN estimate if a part is NaN).
    """
    estimates, errors = [], []
    for num, den, total, is_binary in zip(numerators, denominators, totals, binary):
        n = num.numel()
        mean = float(num.sum() / den.sum())
        if n >= total or not math.isfinite(mean):
            estimates.append(mean)
            errors.append(0.0)
            continue
        weights = den / den.sum()
        values = num / den
        variance = float((weights * (values - mean) ** 2).sum()) * n / max(n - 1, 1)
        if is_binary:
            smoothed = (float(num.sum()) + 1) / (n + 2)
            variance = max(variance, smoothed * (1 - smoothed))
        # Effective sample size of the weighted mean (n for equal weights).
        effective = float(den.sum() ** 2 / (den ** 2).sum())
        widen = 1.0 if z is None else t_over_z(z, n - 1)
        errors.append(math.sqrt(variance / effective * (1 - n / total)) * widen)
        estimates.append(mean)
    return torch.tensor(estimates, dtype=torch.float64), torch.tensor(errors, dtype=torch.float64)


def survivors(estimates: torch.Tensor, errors: torch.Tensor, alive: torch.Tensor, racing: Racing,
              state: RacingState, algorithm_threshold: Callable[[torch.Tensor], float] | None) -> torch.Tensor:
    """Which of the `alive` candidates go on to the next stage.

    Args:
        estimates: ``(P,)`` fitness estimates (NaN/-inf: invalid, dropped); errors: ``(P,)`` their standard errors.
        alive: ``(P,)`` bool, the candidates still being scored.
        algorithm_threshold: the population's lower bounds ``(P,)`` -> the fitness a candidate must be able to
            reach for the algorithm to use it (None: the algorithm uses every candidate, nothing is dropped).
    """
    if algorithm_threshold is None:
        return alive & torch.isfinite(estimates)
    upper = estimates + racing.z * errors
    lower = (estimates - racing.z * errors).nan_to_num(nan=-math.inf)
    pool = sorted([*state.best, *lower.tolist()], reverse=True)
    release_threshold = pool[racing.top_k - 1] if len(pool) >= racing.top_k else -math.inf
    threshold = min(float(algorithm_threshold(lower)), release_threshold)
    return alive & torch.isfinite(estimates) & (upper >= threshold)

