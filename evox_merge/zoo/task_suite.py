"""The zoo's evaluation tasks: one "seen" task per family, ten "unseen" ones, and their disjoint splits.

Unseen tasks are built so that no single expert holds every skill they need:

* ``mix_*`` (exact-match generation): examples drawn from two families (or all eight), each in its own format;
* ``choose_*`` (multiple choice, a format no model was trained on): examples from two families, each offered
  with its right output and five near misses (two neighbouring characters swapped, or one character moved
  to its neighbouring letter or digit).

Every task draws its records from its own RNG stream (seeded by the zoo seed and the task name), so changing one
task never changes another task's examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from evox_merge.zoo.families import FAMILIES, LETTERS, draw_generation

Record = dict


@dataclass(frozen=True)
class TaskDesign:
    """How to draw one task's records.

    Attributes:
        name: the task's name (also its folder under ``tasks/``).
        type: ``generation`` or ``multiple_choice``.
        draw: draws one record from a `random.Random`.
        max_new_tokens: generation only: the longest answer plus its newline.
        group: ``seen`` (an expert's own family) or ``unseen``.
        families: the families whose skills the task needs.
    """

    name: str
    type: str
    draw: Callable[[random.Random], Record]
    max_new_tokens: int
    group: str
    families: tuple[str, ...]


def near_misses(answer: str) -> list[str]:
    """Every string one small slip away from `answer`: two neighbouring characters swapped, a character moved
    one letter up or down (case kept), or a number one to five away. Sorted, without `answer` itself."""
    if answer.isdigit():
        value = int(answer)
        return [str(v) for v in range(max(0, value - 5), value + 6) if v != value]
    slips = {answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :] for i in range(len(answer) - 1)}
    for i, char in enumerate(answer):
        lower = char.lower()
        if lower in LETTERS:
            for step in (-1, 1):
                moved = LETTERS[(LETTERS.index(lower) + step) % len(LETTERS)]
                slips.add(answer[:i] + (moved.upper() if char.isupper() else moved) + answer[i + 1 :])
    slips.discard(answer)
    return sorted(slips)


def _choice_record(names: Sequence[str]) -> Callable[[random.Random], Record]:
    """Multiple choice on examples of `names`: the right output and `NUM_CHOICES - 1` near misses, shuffled."""

    def draw(rng: random.Random) -> Record:
        record = draw_generation(FAMILIES[names[rng.randrange(len(names))]], rng)
        choices = [record["answer"], *rng.sample(near_misses(record["answer"]), NUM_CHOICES - 1)]
        rng.shuffle(choices)
        return {"prompt": record["prompt"], "choices": choices, "answer": choices.index(record["answer"])}

    return draw


def _generation_record(names: Sequence[str]) -> Callable[[random.Random], Record]:
    """Generation on examples of `names`, each drawn from a uniformly chosen family."""

    def draw(rng: random.Random) -> Record:
        return draw_generation(FAMILIES[names[rng.randrange(len(names))]], rng)

    return draw


NUM_CHOICES = 6
MAX_NEW_TOKENS = 11  # the longest answer (``double`` of 5 letters) plus its newline
SEEN_MULTIPLE_CHOICE = ("digit_sum", "length")  # the other seen tasks are exact-match generation

SEEN_TASKS: tuple[TaskDesign, ...] = tuple(
    TaskDesign(name, "multiple_choice", _choice_record((name,)), 1, "seen", (name,))
    if name in SEEN_MULTIPLE_CHOICE
    else TaskDesign(name, "generation", _generation_record((name,)), MAX_NEW_TOKENS, "seen", (name,))
    for name in FAMILIES
)

_MIXTURES = (("reverse", "sort"), ("next", "double"), ("skip", "rotate"), ("digit_sum", "length"))
_CHOICES = (("reverse", "skip"), ("sort", "next"), ("double", "rotate"), ("reverse", "rotate"), ("next", "skip"))

UNSEEN_TASKS: tuple[TaskDesign, ...] = (
    *(TaskDesign(f"mix_{a}_{b}", "generation", _generation_record((a, b)), MAX_NEW_TOKENS, "unseen", (a, b))
      for a, b in _MIXTURES),
    TaskDesign("mix_all", "generation", _generation_record(tuple(FAMILIES)), MAX_NEW_TOKENS, "unseen",
               tuple(FAMILIES)),
    *(TaskDesign(f"choose_{a}_{b}", "multiple_choice", _choice_record((a, b)), 1, "unseen", (a, b))
      for a, b in _CHOICES),
)


def draw_splits(
    design: TaskDesign, seed: int, validation_size: int, test_size: int
) -> tuple[list[Record], list[Record]]:
    """The task's validation and test records: distinct prompts, so no prompt is in both splits.

    Raises:
        RuntimeError: the task's input space is too small for the requested sizes.
    """
    rng = random.Random(f"evox-merge-zoo:{seed}:{design.name}")
    prompts: set[str] = set()
    records: list[Record] = []
    attempts = 0
    while len(records) < validation_size + test_size:
        attempts += 1
        if attempts > 50 * (validation_size + test_size):
            raise RuntimeError(f"task {design.name!r}: cannot draw {validation_size + test_size} distinct prompts")
        record = design.draw(rng)
        if record["prompt"] not in prompts:
            prompts.add(record["prompt"])
            records.append(record)
    return records[:validation_size], records[validation_size:]
