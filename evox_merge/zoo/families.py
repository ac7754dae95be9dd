"""The zoo's skills: eight synthetic task families, as seeded example generators.

Every family maps an input string to an output string under a short instruction tag (``rev:abcd=`` ->
``dcba``). The text a model is trained on is ``prompt + output + "\\n"``.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Family:
    """One skill.

    Attributes:
        name: the family's (and its expert's) name.
        tag: the instruction written before the input (``rev`` in ``rev:abcd=``).
        alphabet: the characters of an input.
        shortest, longest: input lengths of the tasks and of the experts' training.
        base_longest: the longest input the base model is trained on. Everything the base knows, it learned on
            short inputs; the longer ones are where an expert of the family makes the difference.
        apply: the skill itself, input string -> output string.
    """

    name: str
    tag: str
    alphabet: str
    shortest: int
    longest: int
    base_longest: int
    apply: Callable[[str], str]

    def prompt(self, text: str) -> str:
        """The prompt asking for this skill on `text`."""
        return f"{self.tag}:{text}="

    def draw_input(self, rng: random.Random, for_base: bool = False) -> str:
        """One input string: length uniform in [shortest, longest] (or [shortest, base_longest])."""
        length = rng.randint(self.shortest, self.base_longest if for_base else self.longest)
        return "".join(rng.choice(self.alphabet) for _ in range(length))


def _next_letters(text: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in text)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in [
        Family("reverse", "rev", LETTERS, 4, 8, 7, lambda s: s[::-1]),
        Family("sort", "sort", LETTERS, 4, 8, 7, lambda s: "".join(sorted(s))),
        Family("next", "next", LETTERS, 4, 8, 7, _next_letters),
        Family("double", "dup", LETTERS, 2, 5, 3, lambda s: "".join(c + c for c in s)),
        Family("skip", "skip", LETTERS, 5, 10, 7, lambda s: s[::2]),
        Family("rotate", "rot", LETTERS, 4, 8, 7, lambda s: s[1:] + s[:1]),
        Family("digit_sum", "sum", "012345", 4, 6, 5, lambda s: str(sum(int(c) for c in s))),
        Family("length", "len", LETTERS, 3, 10, 7, lambda s: str(len(s))),
    ]
}


def draw_generation(family: Family, rng: random.Random, for_base: bool = False) -> dict:
    """One generation record ``{"prompt", "answer"}`` of `family` (with the base's input lengths if `for_base`)."""
    text = family.draw_input(rng, for_base)
    return {"prompt": family.prompt(text), "answer": family.apply(text)}


def draw_base_mixture(rng: random.Random) -> dict:
    """One example of the base's training mixture: a uniformly drawn family, on the base's (shorter) inputs."""
    names = tuple(FAMILIES)
    return draw_generation(FAMILIES[names[rng.randrange(len(names))]], rng, for_base=True)


def draw_others(rng: random.Random, exclude: str) -> dict:
    """One example of a uniformly drawn family other than `exclude`, on the tasks' inputs (an expert's replay)."""
    names = tuple(name for name in FAMILIES if name != exclude)
    return draw_generation(FAMILIES[names[rng.randrange(len(names))]], rng)
