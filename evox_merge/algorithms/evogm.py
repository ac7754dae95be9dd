"""EvoGM, Evolutionary Generative Merging (arXiv 2605.29295, Algorithm 1), as an EvoX algorithm.

A learned operator replaces mutation: two MLP generators are fitted on the round's history of evaluated coefficient
vectors, split into winners and losers, and the loser-to-winner generator maps the population to the next
candidates. Every few generations the best N vectors become a new expert basis. `variant="paper"` is the faithful
algorithm; the default variant adds switches beyond the paper (evogm_variants.py), each listed, marked *ours*, in the
docstring of `EvoGM`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from evox.core import Algorithm, Mutable, Parameter

from evox_merge.util.errors import MergeInputError

from .common import coefficient_bounds, hybrid_population, initial_points, rank_key, rank_order, split_winners_losers
from .pareto import dominates, pareto_order, split_pareto_winners
from .evogm_basis import RoundBasis
from .evogm_facts import EvoGMRunFacts
from .evogm_history import EvoGMHistory
from .limits import raise_for_evogm
from .evogm_variants import EvoGMSwitches, extrapolate_and_mutate, replace_cached, resolve_switches, success_rule
from .generators import GeneratorPair

__all__ = ["EvoGM", "EvoGMHistory", "EvoGMSwitches"]

log = logging.getLogger(__name__)


class EvoGM(EvoGMRunFacts, Algorithm):
    """Evolutionary Generative Merging (Jiang et al., arXiv 2605.29295, Algorithm 1) over N merge coefficients.

    One `step` is one generation of `pop_size` evaluations, so budgets compare with any EvoX algorithm by evaluations:

    * `init_step`, and the first step of every later round, evaluate the round's hybrid initial population
      (average, one-hots, uniform random) and reset the generators;
    * each other step splits the round's history into winners/losers, trains the generators
      (`train_steps` Adam steps on alpha_c * L_cyc + alpha_o * L_opt), maps the population through G_f, repairs
      it into the box, evaluates the P new candidates and keeps the best P of old and new;
    * after `iterations_per_round` generated populations the best N vectors of the round become the next round's
      expert basis (basis shift).

    A run of R rounds takes `generations_per_run = R * (T + 1)` steps (`init_step` included), that is
    `evaluations_per_run = P * R * (T + 1)` evaluations: 160 with the defaults, the count of the paper's Table 7.
    Every step evaluates exactly P candidates, in every variant. Steps past that budget keep iterating in the last
    round (its history keeps growing), so a workflow with a bigger budget does not fail.

    **Variants.** `variant="paper"` is the algorithm above, exactly (a test pins it to a saved trajectory of the
    code before the switches existed). `variant="default"` turns on the switches below, chosen by the measurements
    in benchmarks/results/landscapes.md; any switch given to the constructor overrides the variant's value. Every
    departure from the paper is *ours*, each documented on `EvoGMSwitches`: `extrapolation` (overshoot along the
    learned direction: the paper's step contracts the population onto the winners' mean, spread 0.45 -> 0.02 in
    one round, issue 12), `mutation` (winners' covariance, 1/5 success rule), `archive` (never re-evaluate; carry
    the round's best P into the next round), `task_arithmetic_scales`, `newer_ties` and `guarded_shift` (a
    well-conditioned basis; the paper's top-N basis measured 7e3 to 5.6e5). *Ours*, every variant: the average
    comes first in the initial population (`hybrid_population`), ``initial`` starting points (the tuned static
    merges) before it in round 0 (the fixed task-arithmetic scales are then left out: the tuned scale replaces
    them), NaN/inf fitness ranks last, the generators train on CPU on one thread.

    **Basis shift and box** (`evox_merge.algorithms.evogm_basis`): the basis shift is a change of coordinates, the
    problem always gets original-basis coefficients c = M_r^T lambda, and every candidate is repaired so that c
    lies in the box [lb, ub], after a shift too *(ours: the paper's c leaves it)*.

    **Inspecting a run, checkpoints, the run layer's protocol**: `evox_merge.algorithms.evogm_facts`.

    **Fitness.** EvoX algorithms minimise; run merges with `StdWorkflow(..., opt_direction="max")`. NaN or infinite
    fitness ranks last everywhere: it is never a winner, never selected over a finite candidate, never a basis
    vector while N finite ones exist. A round whose history has no finite fitness samples uniformly instead of
    training.

    **Randomness.** Every random draw (initial rows, generator weights, mini-batches, extrapolation and mutation)
    comes from one `torch.Generator` seeded with `seed`, never from torch's global RNG, and the generators train
    single-threaded on CPU, so a seed gives a bit-identical history on every run, whatever the problem does with
    the global RNG.

    """

    def __init__(
        self,
        num_experts: int,
        pop_size: int = 20,
        num_rounds: int = 2,
        iterations_per_round: int = 3,
        winner_ratio: float = 0.3,
        hidden_sizes: Sequence[int] = (128, 256, 256, 256, 128),
        lr: float = 1e-4,
        train_steps: int = 200,
        cycle_weight: float = 100.0,
        opt_weight: float = 1.0,
        single_generator: bool = False,
        multi_round: bool = True,
        lb: float | torch.Tensor | None = None,
        ub: float | torch.Tensor | None = None,
        seed: int = 0,
        device: torch.device | None = None,
        variant: str = "default",
        extrapolation: float | None = None,
        mutation: bool | None = None,
        initial_sigma: float | None = None,
        archive: bool | None = None,
        duplicate_tolerance: float | None = None,
        task_arithmetic_scales: Sequence[float] | None = None,
        newer_ties: bool | None = None,
        guarded_shift: bool | None = None,
        max_condition: float | None = None,
        objectives: str = "scalar",
        n_objs: int = 1,
        space: Any = None,
        initial: torch.Tensor | None = None,
    ):
        """Defaults are the authors' public settings (JiangTao97/evogm, config/method/evogm.yaml) plus the default
        variant's switches; `variant="paper"` turns every switch off.

        Args:
            num_experts: N, the length of a coefficient vector.
            pop_size: P. Authors' default 20; the paper says P = 2N and its Table 12 tries 10/20/30.
            num_rounds: R. Default 2 (paper Fig. 3: 2 rounds x 3 iterations); Table 12 tries 1/3/5.
            iterations_per_round: T, generated populations per round. Default 3; Table 12 tries 3/5/8.
            winner_ratio: rho, the share of the round's history that forms H+ (at least one). Paper and code: 0.3.
            hidden_sizes: hidden widths of both five-layer MLP generators (Linear+ReLU each, then Linear+Tanh).
            lr: Adam learning rate. Default 1e-4 (authors' code; Table 12 finds it best); the paper's text says 1e-3.
            train_steps: Adam steps per generation, each one full batch. Default 200 (authors' code; Table 12 finds
                200 slightly better than 400); the paper's text says 400 epochs.
            cycle_weight: alpha_c, the cycle-consistency weight. Default 100 (authors' code; the paper gives none).
                0 is the paper's "w/o cycle loss" ablation (Table 11); G_b then receives no gradient.
            opt_weight: alpha_o, the optimisation-guided loss weight. Default 1.
            single_generator: the "single-generator" ablation (Table 11): only G_f, trained on L_opt alone.
            multi_round: False is the "w/o rounds" ablation (Table 11): one round of R * (T + 1) - 1 iterations,
                the same evaluation budget (the paper turns 2 rounds x 2 iterations into 5 iterations).
            lb: lower bound on lambda and on the coefficients the problem gets, a float or an (N,) tensor. None:
                `limits.DEFAULT_LB` (the paper's is -1, its tanh range).
            ub: upper bound. None: `limits.DEFAULT_UB` (the paper's is 1). The generators' tanh range is mapped
                onto [lb, ub].
            seed: seed of the algorithm's private `torch.Generator`.
            device: device of `pop`/`fit` and of the populations handed to the problem (default: torch's default).
                The generators always train on CPU.
            variant: "paper" (the faithful algorithm) or "default" (switches on); see `EvoGMSwitches`.
            extrapolation, mutation, initial_sigma, archive, duplicate_tolerance, task_arithmetic_scales, newer_ties,
                guarded_shift, max_condition: override the variant's switch (None keeps it); see `EvoGMSwitches`.
            objectives: "scalar" (one fitness per candidate, the paper) or "pareto" *(ours)*: fitness is a
                ``(P, n_objs)`` matrix and every ranking (winners and losers, the population kept, the best, the
                basis shift, the carried elites) is by non-dominated rank, then crowding distance, then age
                (`evox_merge.algorithms.pareto.pareto_order`); a mutation succeeds when the child dominates its
                parent. Everything else is unchanged; "scalar" is the ablation back.
            space: the search space (`evox_merge.experts.spaces`) when it is not one coefficient per expert
                (``num_experts`` is then its dimension): round 0's average, task-arithmetic rows and one-hot
                experts are those merges in the space's coordinates (`hybrid_population`).
            n_objs: the number of objectives with ``objectives="pareto"`` (1 otherwise).
            initial: (M, N) starting points, best first (`common.initial_points`; the tuned static merges): the
                first rows of round 0's initial population, in place of the fixed task-arithmetic scales.

        Raises:
            MergeInputError: an argument outside its valid range.
        """
        super().__init__()
        device = torch.get_default_device() if device is None else torch.device(device)
        raise_for_evogm(num_experts, pop_size, {
            "num_rounds": num_rounds, "iterations_per_round": iterations_per_round, "winner_ratio": winner_ratio,
            "hidden_sizes": hidden_sizes, "lr": lr, "train_steps": train_steps, "cycle_weight": cycle_weight,
            "opt_weight": opt_weight, "single_generator": single_generator, "multi_round": multi_round,
            "variant": variant,
        })
        if not multi_round:
            num_rounds, iterations_per_round = 1, num_rounds * (iterations_per_round + 1) - 1
        if objectives not in ("scalar", "pareto") or n_objs < 1 or (objectives == "scalar" and n_objs != 1):
            raise MergeInputError(f"objectives: expected 'scalar' (n_objs 1) or 'pareto' (n_objs >= 1), got "
                                  f"{objectives!r} with n_objs {n_objs}")
        self.objectives = objectives
        self.n_objs = n_objs
        self.variant = variant
        given = locals()  # the switch arguments, by their names in EvoGMSwitches
        self.switches = resolve_switches(variant, {f.name: given[f.name] for f in dataclasses.fields(EvoGMSwitches)})
        self.num_experts = num_experts
        self.space = space
        self.pop_size = pop_size
        self.num_rounds = num_rounds
        self.iterations_per_round = iterations_per_round
        self.hidden_sizes = tuple(hidden_sizes)
        self.train_steps = train_steps
        self.single_generator = single_generator
        self.winner_ratio = Parameter(winner_ratio, dtype=torch.float64, device=device)
        self.lr = Parameter(lr, dtype=torch.float64, device=device)
        self.cycle_weight = Parameter(cycle_weight, dtype=torch.float64, device=device)
        self.opt_weight = Parameter(opt_weight, dtype=torch.float64, device=device)
        # Internal state lives on CPU: the box and the round bases, the archive.
        self.lb, self.ub = coefficient_bounds(num_experts, lb, ub)
        self.initial = initial_points(initial, num_experts)
        self._basis = RoundBasis(num_experts, self.lb, self.ub)
        self._rng = torch.Generator().manual_seed(seed)
        self._generators = GeneratorPair(num_experts, self.hidden_sizes, dual=not single_generator)
        self.history = EvoGMHistory(num_experts)
        self.generator_log: list[dict[str, Any]] = []
        self._evaluating: tuple[torch.Tensor, int] = (torch.empty(0, num_experts, device="cpu"), 0)
        # Archive switch: the elites carried into the current round (history indices, lambda in its basis).
        self._carried_index = torch.empty(0, dtype=torch.int64, device="cpu")
        self._carried_coefficients = torch.empty(0, num_experts, device="cpu")
        self._sigma = self.switches.initial_sigma
        self.pop = Mutable(torch.zeros(pop_size, num_experts, device=device))
        self.fit = Mutable(torch.full((pop_size,) if objectives == "scalar" else (pop_size, n_objs), torch.inf,
                                      device=device))
        # History indices of the population's rows, and the parents of the candidates being evaluated.
        self._pop_index = torch.zeros(pop_size, dtype=torch.int64, device="cpu")
        self._evaluating_parents: list[Any] | str = "none"

    @property
    def generations_per_run(self) -> int:
        """Workflow steps in R rounds of T iterations, `init_step` included: R * (T + 1)."""
        return self.num_rounds * (self.iterations_per_round + 1)

    @property
    def evaluations_per_run(self) -> int:
        """Problem evaluations in R rounds of T iterations: P * R * (T + 1)."""
        return self.pop_size * self.generations_per_run

    @property
    def current_round(self) -> int:
        """0-based index of the round in progress (0 before `init_step`)."""
        return len(self.bases) - 1

    @property
    def current_iteration(self) -> int:
        """Generated populations evaluated so far in the current round (0 right after its initial population)."""
        return int(self.history.iteration[-1]) if len(self.history) else 0

    @property
    def best_coefficients(self) -> torch.Tensor:
        """(N,) original-basis coefficients of the best evaluation so far (NaN/inf fitness ranked last)."""
        return self.history.original_coefficients[self._best_index()]

    @property
    def best_fitness(self) -> torch.Tensor:
        """Scalar fitness of `best_coefficients`, under minimisation (minus the score with opt_direction="max")."""
        return self.history.fitness[self._best_index()]

    def _best_index(self) -> int:
        if self.objectives == "pareto":
            return int(self._order(self.history.fitness)[0])
        if self.switches.newer_ties:
            return int(rank_order(self.history.fitness, newer_first=True)[0])
        return int(torch.argmin(rank_key(self.history.fitness)))

    def init_step(self) -> None:
        """Evaluate round 0's initial population (P evaluations) and start its generators."""
        self._begin_round()

    def step(self) -> None:
        """One generation of P evaluations: a generated population, or the next round's initial population.

        A workflow that skips `init_step` gets the initial population on its first `step`.
        """
        if len(self.history) == 0:
            self._begin_round()
        elif self.current_iteration >= self.iterations_per_round and self.current_round < self.num_rounds - 1:
            self._shift_basis()
            self._begin_round()
        else:
            self._generate()

    # --- rounds -----------------------------------------------------------------------------------------------

    def _begin_round(self) -> None:
        first = self.current_round == 0
        scales = self.switches.task_arithmetic_scales if first and self.initial is None else ()
        population = self._basis.repair(hybrid_population(
            self.num_experts, self.pop_size, self.lb, self.ub, self._rng, scales,
            space=self.space if first else None, initial=self.initial if first else None))
        if self.switches.archive:
            population = self._replace_cached(population, around=False)
        self._evaluating_parents = "experts" if self.current_round == 0 else list(self.basis_records[-1])
        first = len(self.history)
        fitness = self._evaluate_and_record(population, iteration=0)
        index = torch.arange(first, len(self.history))
        if len(self._carried_index):
            population = torch.cat([self._carried_coefficients, population])
            fitness = torch.cat([self.history.fitness[self._carried_index], fitness])
            index = torch.cat([self._carried_index, index])
            keep = self._order(fitness)[: self.pop_size]
            population, fitness, index = population[keep], fitness[keep], index[keep]
        self._set_population(population, fitness, index)
        self._sigma = self.switches.initial_sigma
        self._generators.reset(float(self.lr), self._rng)
        log.info(
            "EvoGM round %d/%d: initial population evaluated, best fitness %.6g (minimised)",
            self.current_round + 1,
            self.num_rounds,
            float(rank_key(fitness).min()),
        )

    def _order(self, fitness: torch.Tensor) -> torch.Tensor:
        """Indices best first: by fitness (scalar) or by Pareto rank and crowding (pareto); failures last."""
        if self.objectives == "pareto":
            return pareto_order(fitness, self.switches.newer_ties)
        return rank_order(fitness, self.switches.newer_ties)

    def _round_data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The round's archive H: history indices (H,), lambda in the round's basis (H, N), fitness (H,); the carried
        elites first (older), then the round's evaluations in order."""
        in_round = torch.nonzero(self.history.round == self.current_round).squeeze(1)
        index = torch.cat([self._carried_index, in_round])
        coefficients = torch.cat([self._carried_coefficients, self.history.coefficients[in_round]])
        return index, coefficients, self.history.fitness[index]

    def _shift_basis(self) -> None:
        index, coefficients, fitness = self._round_data()
        order = self._order(fitness)
        if not self._basis.shift(index, coefficients, self.history.original_coefficients[index], order,
                                 self.switches.guarded_shift, self.switches.max_condition):
            log.info("EvoGM round %d: no well-conditioned basis among its vectors, basis kept", self.current_round)
        if self.switches.archive:
            carried = index[order[: self.pop_size]]
            finite = torch.isfinite(self.history.fitness[carried])
            carried = carried[finite if finite.ndim == 1 else finite.all(-1)]
            self._carried_index = carried
            self._carried_coefficients = self._basis.coordinates_of(self.history.original_coefficients[carried])

    # --- generation -------------------------------------------------------------------------------------------

    def _generate(self) -> None:
        iteration = self.current_iteration + 1
        _, coefficients, fitness = self._round_data()
        split = split_pareto_winners if self.objectives == "pareto" else split_winners_losers
        winners, losers = split(fitness, float(self.winner_ratio), self.switches.newer_ties)
        replaced = 0
        self._evaluating_parents = [[int(i)] for i in self._pop_index] if len(winners) else "none"
        if len(winners) == 0:
            log.warning("EvoGM round %d: no finite fitness yet, sampling uniformly", self.current_round + 1)
            draws = torch.rand(self.pop_size, self.num_experts, generator=self._rng, device="cpu")
            candidates = self.lb + (self.ub - self.lb) * draws
        else:
            candidates = self._train_and_generate(coefficients[winners], coefficients[losers], iteration)
            candidates = self._perturb(candidates, coefficients[winners])
        candidates = self._basis.repair(candidates)
        if self.switches.archive:
            fresh = self._replace_cached(candidates, around=True)
            replaced = int((fresh != candidates).any(-1).sum())
            candidates = fresh
        new_fitness = self._evaluate_and_record(candidates, iteration)
        if len(winners) > 0 and self.generator_log:
            self.generator_log[-1].update(sigma=self._sigma, replaced=replaced)
        if self.switches.mutation and len(winners) > 0:
            if self.objectives == "pareto":
                success = dominates(new_fitness, self.fit.cpu()).float().mean()
            else:
                success = (rank_key(new_fitness) < rank_key(self.fit.cpu())).float().mean()
            self._sigma = success_rule(self._sigma, float(success))
        pool = torch.cat([self.pop.cpu(), candidates])
        pool_fitness = torch.cat([self.fit.cpu(), new_fitness])
        pool_index = torch.cat([self._pop_index, torch.arange(len(self.history) - len(candidates), len(self.history))])
        keep = self._order(pool_fitness)[: self.pop_size]
        self._set_population(pool[keep], pool_fitness[keep], pool_index[keep])

    def _perturb(self, generated: torch.Tensor, winners: torch.Tensor) -> torch.Tensor:
        """Extrapolation and mutation switches, in the generators' [-1, 1] coordinates; the identity when off."""
        if not (self.switches.extrapolation or self.switches.mutation):
            return generated
        to_generator = self._basis.to_generator_space
        parents, winners, targets = to_generator(self.pop.cpu()), to_generator(winners), to_generator(generated)
        sigma = self._sigma if self.switches.mutation else 0.0
        return self._basis.from_generator_space(
            extrapolate_and_mutate(parents, targets, winners, self.switches.extrapolation, sigma, self._rng)
        )

    def _replace_cached(self, candidates: torch.Tensor, around: bool) -> torch.Tensor:
        """Archive switch: rows already evaluated (original basis) become fresh candidates; see `replace_cached`."""
        step = max(self._sigma, 0.05) * (self.ub - self.lb) / 2 if around else None
        return replace_cached(candidates, self.bases[-1], self.history.original_coefficients,
                              self.switches.duplicate_tolerance, self.lb, self.ub, step, self._rng, self._basis.repair)

    def _train_and_generate(self, winners: torch.Tensor, losers: torch.Tensor, iteration: int) -> torch.Tensor:
        start = time.perf_counter()
        to_generator, from_generator = self._basis.to_generator_space, self._basis.from_generator_space
        losses = self._generators.train(to_generator(winners), to_generator(losers), self.train_steps,
                                        float(self.cycle_weight), float(self.opt_weight), self._rng)
        candidates = from_generator(self._generators.generate(to_generator(self.pop.cpu())))
        seconds = time.perf_counter() - start
        self.generator_log.append(
            {
                "round": self.current_round,
                "iteration": iteration,
                "generation": len(self.history) // self.pop_size,
                "winners": len(winners),
                "losers": len(losers),
                "losses": losses,
                "seconds": seconds,
            }
        )
        log.debug(
            "EvoGM round %d iteration %d: final loss %.4g (cycle %.4g, opt %.4g), generators took %.3f s",
            self.current_round + 1,
            iteration,
            *losses[-1].tolist(),
            seconds,
        )
        return candidates

    def _evaluate_and_record(self, coefficients: torch.Tensor, iteration: int) -> torch.Tensor:
        # The problem always sees original-basis coefficients c = M^T lambda (rows: lambda @ M), in the box.
        original = self._basis.to_original(coefficients)
        self._evaluating = (coefficients, iteration)
        fitness = self.evaluate(original.to(self.pop.device))
        expected = (len(coefficients),) if self.objectives == "scalar" else (len(coefficients), self.n_objs)
        if fitness.shape != expected:
            raise MergeInputError(
                f"problem fitness: EvoGM with objectives={self.objectives!r} is "
                f"{'single' if self.objectives == 'scalar' else 'multi'}-objective and expects shape {expected}, got "
                f"{tuple(fitness.shape)}; " + ("reduce per-task scores to one score per candidate"
                                               if self.objectives == "scalar" else "give one column per objective")
            )
        fitness = fitness.detach().to("cpu", torch.float32)
        self.history.append(
            coefficients, original, fitness, self.current_round, iteration, len(self.history) // self.pop_size
        )
        return fitness

    def _set_population(self, population: torch.Tensor, fitness: torch.Tensor, index: torch.Tensor) -> None:
        self.pop = population.to(self.pop.device)
        self.fit = fitness.to(self.fit.device)
        self._pop_index = index.to("cpu", torch.int64)
