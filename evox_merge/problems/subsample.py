"""Subsample mode: every generation scores its candidates on a fresh subset of each task's search part, so that a
fixed cost per candidate sees more distinct examples over a run, while comparisons stay paired.

With a fixed subset a search fits the same m examples per task for its whole run. In subsample mode (config
``subsample: {size, elites}``, `SubsampleSettings`) generation g scores its population on a subset S_g of m examples
of each task's search part instead; over a run the search sees up to the whole search part at the cost of m
examples per candidate.

**The subsets.** Each task's search part (n examples) is cut into ``B = n // m`` disjoint blocks of m by a
permutation drawn from a torch generator seeded with (seed, task, epoch); generation g takes block ``g % B`` of
epoch ``g // B`` (`subset_indices`). So consecutive generations see disjoint examples until the part is used up,
and S_g depends only on the seed and g: never on the run's history, so a resumed run draws the same subsets.

**Paired comparisons.** A score on m examples carries the subset's difficulty: every candidate of an easy
generation looks good. Within a generation all candidates share S_g, so CMA-ES, which ranks only the population
just evaluated, is paired as is. Algorithms that keep fitness across generations (EvoGM's round archive, its
population and carried elites; PSO's personal and global bests; random search's best) would compare scores on
different examples. So:

* every generation also re-scores the run's best ``elites`` candidates (by the estimates below; those not in the
  population) on S_g. A candidate scored in two or more generations (an elite, or a point an algorithm proposed
  again) is an *anchor*: its estimate is its score on the union of the examples it has seen (each example once);
* a candidate scored in one generation h gets its score on S_h plus that generation's offset, the mean over the
  anchors scored on S_h of (anchor's union score - anchor's S_h score), per task (0 while S_h has no anchor). So
  ``estimate(x) - mean_a estimate(a) = score(x; S_h) - mean_a score(a; S_h)``: a candidate stands against the
  anchors exactly as it did on the examples they shared, a paired comparison, and candidates of one generation
  keep their paired differences. Every estimate is recomputed after each generation (the anchors' unions grow),
  and what an algorithm holds is rewritten with the new estimates before it compares anything
  (`evox_merge.run.workflow.refresh_held_fitness`: EvoGM's history and population, PSO's bests, random search's
  best; CMA-ES holds none).

The cost: each generation scores P + (up to) ``elites`` candidates on m examples per task. Records
(`annotations`) say which subset a candidate was scored on (``subset.id`` = the generation, examples per task,
the elites re-scored), its ``subset_fitness`` there, and as ``fitness`` the estimate the algorithm got. The
release does not trust estimates: the top-k candidates by estimate are re-scored on the full search part
(`release_pool`) before the contest, and the search-part scores of every merge in recipe.json are on the full part.
The ledger (every distinct candidate's per-generation and union sums) is checkpointed with the workflow
(`get_extra_state`), so a resumed run continues bit-identically.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from evox_merge.util.errors import MergeInputError


@dataclass(frozen=True)
class SubsampleSettings:
    """Subsample mode's settings (config ``subsample``; see the module docstring).

    Attributes:
        size: examples per task per generation: an integer >= 1 (a smaller search part gives all of it) or a
            fraction in (0, 1) of each task's search part (rounded up, at least 1).
        elites: the run's best candidates re-scored on every generation's subset (>= 1).
        seed: the run's seed; the subsets depend only on it and the generation.
    """

    size: int | float
    elites: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, bool) or not isinstance(size, (int, float)) or (
                isinstance(size, int) and size < 1) or (isinstance(size, float) and not 0 < size < 1):
            raise MergeInputError(f"subsample.size: expected an integer >= 1 or a fraction in (0, 1), got {size!r}")
        if isinstance(self.elites, bool) or not isinstance(self.elites, int) or self.elites < 1:
            raise MergeInputError(f"subsample.elites: expected an integer >= 1, got {self.elites!r}")

    def counts(self, totals: Sequence[int]) -> list[int]:
        """Examples per generation for tasks whose search parts hold `totals` examples."""
        if isinstance(self.size, float):
            return [max(1, math.ceil(self.size * total)) for total in totals]
        return [min(self.size, total) for total in totals]


def _stream_seed(seed: int, task: int, epoch: int) -> int:
    """The seed of one task's permutation in one epoch (a hash of the three, below 2**63)."""
    digest = hashlib.sha256(f"evox-merge subsample {seed} {task} {epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def subset_indices(seed: int, generation: int, task: int, total: int, count: int) -> torch.Tensor:
    """Positions (sorted, int64) of generation `generation`'s `count` examples among a task's `total`: block
    ``g % B`` of a permutation seeded with (seed, task, ``g // B``), ``B = total // count``."""
    if not 1 <= count <= total or generation < 0:
        raise ValueError(f"subset of {count} among {total} examples for generation {generation}")
    blocks = total // count
    epoch, block = divmod(generation, blocks)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(_stream_seed(seed, task, epoch)))
    return order[block * count:(block + 1) * count].sort().values


def _key(row: torch.Tensor) -> bytes:
    """A candidate's identity: the bytes of its float32 coefficients."""
    return row.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def _ratio(sums: torch.Tensor) -> torch.Tensor:
    """Task scores from ``(..., K, 2)`` (numerator, denominator) sums."""
    return sums[..., 0] / sums[..., 1]


class Subsampler(torch.nn.Module):
    """The subsets, the ledger of every distinct candidate's scores and the estimates (module docstring).

    A `torch.nn.Module` only to ride in the workflow's `state_dict` (`get_extra_state`): set it as the workflow's
    ``subsample`` (`evox_merge.run.workflow.build_workflow`), call `begin` before each generation (the run loop
    does) and let the workflow's `evaluate` go through it.

    Args:
        settings: size, elites and seed.
        task_names, totals: the tasks and how many examples each task's search part holds.
    """

    def __init__(self, settings: SubsampleSettings, task_names: Sequence[str], totals: Sequence[int]) -> None:
        super().__init__()
        if len(task_names) != len(totals) or not totals or min(totals) < 1:
            raise MergeInputError("subsample: every task needs at least one search example")
        self.settings = settings
        self.task_names = list(task_names)
        self.totals = [int(total) for total in totals]
        self.counts = settings.counts(self.totals)
        self.generation: int | None = None
        self._subsets: dict[int, list[torch.Tensor]] = {}
        self._scorers: tuple[int, list] | None = None
        self._reset()

    def _reset(self) -> None:
        self._keys: dict[bytes, int] = {}
        self._coefficients: list[torch.Tensor] = []  # per entry (D,) float32
        self._records: list[int] = []  # per entry, the record id of its first evaluation
        self._generations: list[list[int]] = []  # per entry, the generations it was scored in
        self._sums: list[list[torch.Tensor]] = []  # per entry and generation: (K, 2) float64 sums on that subset
        self._union: list[torch.Tensor] = []  # per entry: (K, 2) float64 sums over its distinct examples
        self.candidates = 0  # population rows evaluated (the next record id)
        self.rescorings = 0  # elites re-scored
        self._table: torch.Tensor | None = None
        self._last: dict[str, Any] = {}

    # --- subsets ----------------------------------------------------------------------------------------------

    def begin(self, generation: int) -> None:
        """Score the next evaluation on generation `generation`'s subset."""
        self.generation = generation

    def subset(self, generation: int) -> list[torch.Tensor]:
        """Per task, the positions in its search part of generation `generation`'s examples."""
        if generation not in self._subsets:
            self._subsets[generation] = [
                subset_indices(self.settings.seed, generation, k, total, count)
                for k, (total, count) in enumerate(zip(self.totals, self.counts))]
        return self._subsets[generation]

    def _subset_scorers(self, problem, generation: int) -> list:
        """The problem's scorers over generation `generation`'s subset (built once per generation)."""
        if self._scorers is None or self._scorers[0] != generation:
            self._scorers = (generation, problem.subset_scorers(self.subset(generation)))
        return self._scorers[1]

    # --- evaluation -------------------------------------------------------------------------------------------

    def evaluate(self, problem, pop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score the population and the elites on this generation's subset and update the ledger.

        Args:
            problem: the `MergeProblem` over the search part (its `subset_scorers`, `scoring_on`).
            pop: ``(P, D)`` candidates.

        Returns:
            the population's raw task scores on the subset ``(P, K)`` and their estimates ``(P, K)`` (float64).
        """
        if self.generation is None:
            raise RuntimeError("Subsampler.begin(generation) must be called before each generation")
        if [len(task.records) for task in problem.tasks] != self.totals:
            raise MergeInputError("subsample: the problem's search parts are not the ones the subsampler was built for")
        generation = self.generation
        pop = problem.check_population(pop)
        count = len(pop)
        fitness = self.entry_fitness(problem, self._estimates())
        in_pop = {self._keys[key] for key in map(_key, pop) if key in self._keys}
        elites = self._best(fitness, in_pop, self.settings.elites)
        rows = torch.cat([pop, torch.stack([self._coefficients[i] for i in elites]).to(pop.device)]) if elites \
            else pop
        parts, raw = self._score(problem, rows, generation)
        for r, row in enumerate(rows):
            if r < count:
                index = self._keys.get(_key(row))
                if index is None:
                    index = self._new_entry(row, self.candidates + r)
            else:
                index = elites[r - count]
            self._add(index, generation, parts[r])
        self.candidates += count
        self.rescorings += len(elites)
        self._table = self._estimates()
        estimates = self._table[[self._keys[_key(row)] for row in pop]]
        subset_fitness = self.entry_fitness(problem, raw[:count])
        self._last = {
            "fitness": [_finite(v) for v in self.entry_fitness(problem, estimates).tolist()],
            "subset_fitness": [_finite(v) for v in subset_fitness.tolist()],
            "examples_scored": sum(self.counts), "examples_total": sum(self.totals),
            "subset": {"id": generation, "examples": dict(zip(self.task_names, self.counts)),
                       "rescored": [self._records[i] for i in elites]},
        }
        return raw[:count], estimates

    def _score(self, problem, rows: torch.Tensor, generation: int) -> tuple[list, torch.Tensor]:
        """Per row its per-task ``(numerators, denominators)`` per example on the subset, and the raw scores."""
        scorers = self._subset_scorers(problem, generation)
        with problem.scoring_on(scorers), problem.recording_example_parts() as parts:
            raw = problem.evaluate_per_task(rows)
        tasks = len(scorers)
        return [parts[r * tasks:(r + 1) * tasks] for r in range(len(rows))], raw

    def _new_entry(self, row: torch.Tensor, record: int) -> int:
        self._keys[_key(row)] = len(self._coefficients)
        self._coefficients.append(row.detach().to("cpu", torch.float32).clone())
        self._records.append(record)
        self._generations.append([])
        self._sums.append([])
        self._union.append(torch.zeros(len(self.totals), 2, dtype=torch.float64))
        return len(self._coefficients) - 1

    def _add(self, index: int, generation: int, parts: list) -> None:
        """Add one entry's per-example parts on `generation`'s subset: its sums there, and the examples it had not
        seen to its union."""
        generations = self._generations[index]
        if generation in generations:
            return  # the same candidate twice in one population: the same examples, the same values
        subset = self.subset(generation)
        sums, new = [], []
        for k, (numerators, denominators) in enumerate(parts):
            numerators, denominators = numerators.double(), denominators.double()
            sums.append(torch.stack([numerators.sum(), denominators.sum()]))
            if generations:
                seen = torch.cat([self.subset(h)[k] for h in generations])
                fresh = ~torch.isin(subset[k], seen)
                numerators, denominators = numerators[fresh], denominators[fresh]
            new.append(torch.stack([numerators.sum(), denominators.sum()]))
        generations.append(generation)
        self._sums[index].append(torch.stack(sums))
        self._union[index] = self._union[index] + torch.stack(new)

    # --- estimates --------------------------------------------------------------------------------------------

    def offsets(self) -> dict[int, torch.Tensor]:
        """Per generation with anchors, its ``(K,)`` offset: the mean over the anchors scored on its subset of
        (union score - score on the subset), over the finite ones (0 where none is finite)."""
        differences: dict[int, list[torch.Tensor]] = {}
        for generations, sums, union in zip(self._generations, self._sums, self._union):
            if len(generations) < 2:
                continue
            for generation, part in zip(generations, sums):
                differences.setdefault(generation, []).append(_ratio(union) - _ratio(part))
        offsets = {}
        for generation, values in differences.items():
            stacked = torch.stack(values)
            finite = torch.isfinite(stacked)
            offsets[generation] = torch.where(finite, stacked, 0.0).sum(0) / finite.sum(0).clamp(min=1)
        return offsets

    def _estimates(self) -> torch.Tensor:
        """``(E, K)`` raw task-score estimates of every entry, in entry order (module docstring)."""
        tasks = len(self.totals)
        if not self._coefficients:
            return torch.empty(0, tasks, dtype=torch.float64)
        offsets = self.offsets()
        zero = torch.zeros(tasks, dtype=torch.float64)
        rows = [_ratio(union) if len(generations) > 1 else _ratio(sums[0]) + offsets.get(generations[0], zero)
                for generations, sums, union in zip(self._generations, self._sums, self._union)]
        return torch.stack(rows)

    @staticmethod
    def entry_fitness(problem, task_scores: torch.Tensor) -> torch.Tensor:
        """The problem's fitness of raw task scores ``(E, K)`` (normalised weighted mean, NaN as its
        ``invalid_fitness``), without its warning: estimates are recomputed every generation."""
        if not len(task_scores):
            return torch.empty(0, dtype=torch.float64)
        fitness = problem.normalisation.apply(task_scores) @ problem.task_weights
        return fitness.nan_to_num(nan=problem.invalid_fitness)

    @staticmethod
    def _best(fitness: torch.Tensor, exclude: set[int], count: int) -> list[int]:
        """The best `count` entries with finite fitness not in `exclude` (the earlier entry first on ties)."""
        ranked = sorted((i for i in range(len(fitness)) if math.isfinite(float(fitness[i])) and i not in exclude),
                        key=lambda i: (-float(fitness[i]), i))
        return ranked[:count]

    def fitness_of(self, problem, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Current fitness estimates ``(H,)`` of candidates ``(H, D)`` and whether each one is in the ledger
        (``(H,)`` bool; a candidate never scored gets NaN)."""
        table = self._table if self._table is not None else self._estimates()
        indices = [self._keys.get(_key(row)) for row in rows.reshape(-1, rows.shape[-1])]
        known = torch.tensor([index is not None for index in indices], dtype=torch.bool)
        fitness = torch.full((len(indices),), math.nan, dtype=torch.float64)
        if bool(known.any()):
            chosen = [index for index in indices if index is not None]
            fitness[known] = self.entry_fitness(problem, table[chosen])
        return fitness, known

    def annotations(self) -> dict[str, Any]:
        """For the last evaluation's records: ``fitness`` (the estimate the algorithm got), ``subset_fitness``,
        ``examples_scored`` / ``examples_total`` (per task summed) and ``subset`` (id, examples per task, the
        record ids of the elites re-scored)."""
        return dict(self._last)

    # --- the release ------------------------------------------------------------------------------------------

    def release_pool(self, problem, count: int, rescore: bool = True) -> list[dict[str, Any]]:
        """The best `count` candidates by estimate, re-scored on the problem's full search part: record-like dicts
        (``id``, ``coefficients``, ``fitness`` on the full part, ``estimate``, ``task_scores``) for
        `evox_merge.run.selection.searched_candidates`. Without `rescore`, ``fitness`` is the estimate and nothing
        is scored (the same candidates, in estimate order)."""
        fitness = self.entry_fitness(problem, self._estimates())
        chosen = self._best(fitness, set(), count)
        if not chosen:
            return []
        if not rescore:
            return [{"id": self._records[i], "coefficients": self._coefficients[i].tolist(),
                     "fitness": _finite(float(fitness[i])), "estimate": _finite(float(fitness[i]))} for i in chosen]
        scores = problem.evaluate_per_task(torch.stack([self._coefficients[i] for i in chosen]))
        full = self.entry_fitness(problem, scores)
        return [{"id": self._records[i], "coefficients": self._coefficients[i].tolist(), "fitness": _finite(float(f)),
                 "estimate": _finite(float(fitness[i])),
                 "task_scores": {name: _finite(float(s)) for name, s in zip(self.task_names, row)}}
                for i, f, row in zip(chosen, full, scores)]

    def summary(self) -> dict[str, Any]:
        """For recipe.json: the settings, examples per generation and per search part, what the run scored."""
        seen = [set() for _ in self.totals]
        for generation in sorted({g for generations in self._generations for g in generations}):
            for k, index in enumerate(self.subset(generation)):
                seen[k].update(index.tolist())
        return {"size": self.settings.size, "elites": self.settings.elites,
                "examples_per_generation": dict(zip(self.task_names, self.counts)),
                "search_part": dict(zip(self.task_names, self.totals)),
                "candidates": self.candidates, "rescorings": self.rescorings,
                "distinct_examples_seen": {name: len(s) for name, s in zip(self.task_names, seen)}}

    # --- checkpoints ------------------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """The ledger, saved by the workflow's `state_dict()`."""
        return {"totals": list(self.totals), "counts": list(self.counts), "candidates": self.candidates,
                "rescorings": self.rescorings, "coefficients": [c.clone() for c in self._coefficients],
                "records": list(self._records), "generations": [list(g) for g in self._generations],
                "sums": [[s.clone() for s in sums] for sums in self._sums],
                "union": [u.clone() for u in self._union]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore `get_extra_state`'s ledger (refused when it was saved for other search parts or sizes)."""
        if state["totals"] != self.totals or state["counts"] != self.counts:
            raise ValueError(f"subsample state for search parts {state['totals']} / subsets {state['counts']}, this "
                             f"run has {self.totals} / {self.counts}")
        self._reset()
        for coefficients, record, generations, sums, union in zip(
                state["coefficients"], state["records"], state["generations"], state["sums"], state["union"]):
            index = self._new_entry(coefficients, record)
            self._generations[index] = list(generations)
            self._sums[index] = [s.clone() for s in sums]
            self._union[index] = union.clone()
        self.candidates, self.rescorings = int(state["candidates"]), int(state["rescorings"])


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
