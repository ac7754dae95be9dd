"""The smollm2 zoo's data: the corpus read from the registry archives, its seeded train/validation/test split by
item, the evaluation tasks and the experts' training rows.

Every item (a first name, a CMUdict word, a stop word, a HumanEval problem, a State of the Union address, a Moby-Dick
chapter) belongs to exactly one of three pools, ``train``, ``validation`` or ``test``, chosen by a hash of the seed,
the source and the item. Experts train on ``train`` items only; every task's validation split draws from
``validation`` items and its test split from ``test`` items, so no evaluation example shares an item with any
training row or with the other split. The standard-library source only ever trains (the code expert); HumanEval only
ever evaluates.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from evox_merge.zoo.smollm2 import sources

SPLITS = ("train", "validation", "test")
# Share of each source's items in the validation and test pools (the rest trains).
POOL_FRACTIONS: dict[str, tuple[float, float]] = {
    "names": (0.08, 0.16),
    "syllables": (0.02, 0.04),
    "stopwords": (0.2, 0.4),
    "moby_dick": (0.12, 0.24),
    "sotu": (0.12, 0.24),
    "human_eval": (0.25, 0.75),
    "stdlib": (0.0, 0.0),
}
MAX_SYLLABLES = 5  # multiple choice offers " 1" to " 5"; longer words are left out everywhere
PROSE_CHARS = 200  # a language-modelling text: whole words from a sentence start, at least this long (~45 tokens)
CODE_CHARS = 200  # the same for code: whole lines
REPLAY_CHARS = 80  # the shorter texts of language-modelling replay rows (they keep other experts' batches short)


@dataclass(frozen=True)
class Corpus:
    """Everything the zoo reads from its sources (see `sources`)."""

    names: dict[str, str]
    syllables: dict[str, int]
    stopwords: list[str]
    moby_dick: dict[str, str]
    sotu: dict[str, str]
    human_eval: dict[str, str]
    stdlib: dict[str, str]


def read_corpus(archives: dict[str, Path], stdlib_folder: str | Path | None = None) -> Corpus:
    """Read every source from its archive (keys of `fetch.PACKAGES`) and this Python's standard library."""
    names = sources.read_names(archives["female_names"], archives["male_names"])
    stopwords = sources.read_stopwords(archives["stopwords"])
    excluded = {name.lower() for name in names} | set(stopwords)  # every word item belongs to one source only
    syllables = {w: n for w, n in sources.read_syllables(archives["cmudict"]).items()
                 if w not in excluded and n <= MAX_SYLLABLES and len(w) >= 3}
    return Corpus(
        names=names,
        syllables=syllables,
        stopwords=stopwords,
        moby_dick=sources.read_moby_dick(archives["moby_dick"]),
        sotu=sources.read_sotu(archives["sotu"]),
        human_eval=sources.read_human_eval(archives["human_eval"]),
        stdlib=sources.read_stdlib(folder=stdlib_folder),
    )


def split_items(keys, seed: int, source: str) -> dict[str, list[str]]:
    """The items `keys` of `source` in the pools ``train``, ``validation``, ``test`` (each sorted): the items are
    ordered by a hash of (seed, source, item) and the first ones go to validation, the next to test."""
    validation_share, test_share = POOL_FRACTIONS[source]
    ranked = sorted(keys, key=lambda key: hashlib.sha256(f"evox-merge-smollm2:{seed}:{source}:{key}".encode()).digest())
    n_validation = round(validation_share * len(ranked))
    n_test = round(test_share * len(ranked))
    return {
        "validation": sorted(ranked[:n_validation]),
        "test": sorted(ranked[n_validation : n_validation + n_test]),
        "train": sorted(ranked[n_validation + n_test :]),
    }


class Pools:
    """The corpus split into pools: ``pools.items(source, split)`` lists the items of one source in one pool."""

    def __init__(self, corpus: Corpus, seed: int) -> None:
        self.corpus = corpus
        self._items = {
            "names": split_items(corpus.names, seed, "names"),
            "syllables": split_items(corpus.syllables, seed, "syllables"),
            "stopwords": split_items(corpus.stopwords, seed, "stopwords"),
            "moby_dick": split_items(corpus.moby_dick, seed, "moby_dick"),
            "sotu": split_items(corpus.sotu, seed, "sotu"),
            "human_eval": split_items(corpus.human_eval, seed, "human_eval"),
            "stdlib": split_items(corpus.stdlib, seed, "stdlib"),
        }

    def items(self, source: str, split: str) -> list[str]:
        return self._items[source][split]


# --- one example of each kind ------------------------------------------------------------------------------------

def gender_prompt(name: str) -> str:
    return f"Name: {name}\nGender:"


def syllables_prompt(word: str) -> str:
    return f"Word: {word}\nSyllables:"


def stopword_prompt(word: str) -> str:
    return f"Word: {word}\nStop word:"


def prose_window(text: str, rng: random.Random, chars: int = PROSE_CHARS) -> str:
    """Whole words of `text` from a random sentence start, at least `chars` characters (or to the end)."""
    starts = [0] + [i + 2 for i in range(len(text) - 2) if text[i] in ".?!" and text[i + 1] == " "]
    starts = [s for s in starts if len(text) - s >= chars] or [0]
    start = starts[rng.randrange(len(starts))]
    words, length = [], 0
    for word in text[start:].split(" "):
        words.append(word)
        length += len(word) + 1
        if length > chars:
            break
    return " ".join(words).strip()


def code_window(source: str, rng: random.Random, chars: int = CODE_CHARS) -> str:
    """Whole lines of `source` from a random non-blank line, at least `chars` characters (or to the end)."""
    lines = source.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() and sum(len(l) + 1 for l in lines[i:]) >= chars]
    starts = starts or [0]
    start = starts[rng.randrange(len(starts))]
    taken, length = [], 0
    for line in lines[start:]:
        taken.append(line.rstrip())
        length += len(line) + 1
        if length >= chars:
            break
    return "\n".join(taken).strip("\n")


Draw = Callable[[random.Random, str], dict]


class Examples:
    """Draws the examples of every kind from the pools: evaluation records (`gender`, ..., `code`) from a split's
    pool, and training rows (`training_row`) from the ``train`` pool."""

    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self.corpus = pools.corpus

    def _pick(self, rng: random.Random, source: str, split: str) -> str:
        items = self.pools.items(source, split)
        return items[rng.randrange(len(items))]

    def gender(self, rng: random.Random, split: str) -> dict:
        name = self._pick(rng, "names", split)
        choices = [" female", " male"]
        return {"prompt": gender_prompt(name), "choices": choices,
                "answer": choices.index(" " + self.corpus.names[name])}

    def syllables(self, rng: random.Random, split: str) -> dict:
        word = self._pick(rng, "syllables", split)
        return {"prompt": syllables_prompt(word), "answer": str(self.corpus.syllables[word])}

    def syllables_choice(self, rng: random.Random, split: str) -> dict:
        record = self.syllables(rng, split)
        choices = [f" {n}" for n in range(1, MAX_SYLLABLES + 1)]
        return {"prompt": record["prompt"], "choices": choices, "answer": int(record["answer"]) - 1}

    def _stopword_item(self, rng: random.Random, split: str) -> tuple[str, bool]:
        """A stop word or, as often, a CMUdict word (not a stop word) of the same pool."""
        if rng.random() < 0.5:
            return self._pick(rng, "stopwords", split), True
        return self._pick(rng, "syllables", split), False

    def stopword(self, rng: random.Random, split: str) -> dict:
        word, stop = self._stopword_item(rng, split)
        return {"prompt": stopword_prompt(word), "choices": [" yes", " no"], "answer": 0 if stop else 1}

    def stopword_answer(self, rng: random.Random, split: str) -> dict:
        """The same question as generation: the answer ``yes`` or ``no``."""
        word, stop = self._stopword_item(rng, split)
        return {"prompt": stopword_prompt(word), "answer": "yes" if stop else "no"}

    def moby_dick(self, rng: random.Random, split: str, chars: int = PROSE_CHARS) -> dict:
        return {"text": prose_window(self.corpus.moby_dick[self._pick(rng, "moby_dick", split)], rng, chars)}

    def sotu(self, rng: random.Random, split: str, chars: int = PROSE_CHARS) -> dict:
        return {"text": prose_window(self.corpus.sotu[self._pick(rng, "sotu", split)], rng, chars)}

    def code(self, rng: random.Random, split: str, chars: int = CODE_CHARS) -> dict:
        """HumanEval (prompt + canonical solution) in evaluation; the standard library in training."""
        if split == "train":
            return {"text": code_window(self.corpus.stdlib[self._pick(rng, "stdlib", "train")], rng, chars)}
        return {"text": code_window(self.corpus.human_eval[self._pick(rng, "human_eval", split)], rng, chars)}

    def training_row(self, kind: str, rng: random.Random, replay: bool = False) -> dict:
        """One training row ``{"prompt", "answer"}`` of `kind` from the train pool: the answer a model must write
        after the prompt (a choice with its leading space; a whole text after an empty prompt, `REPLAY_CHARS` long
        in a `replay` row)."""
        if kind == "gender":
            name = self._pick(rng, "names", "train")
            return {"prompt": gender_prompt(name), "answer": " " + self.corpus.names[name]}
        if kind == "syllables":
            record = self.syllables(rng, "train")
            return {"prompt": record["prompt"], "answer": " " + record["answer"]}
        if kind == "stopword":
            record = self.stopword_answer(rng, "train")
            return {"prompt": record["prompt"], "answer": " " + record["answer"]}
        if kind in ("moby_dick", "sotu", "code"):
            chars = REPLAY_CHARS if replay else (CODE_CHARS if kind == "code" else PROSE_CHARS)
            return {"prompt": "", "answer": getattr(self, kind)(rng, "train", chars)["text"]}
        raise KeyError(f"no training rows of kind {kind!r}")


def mixture(*draws: Draw) -> Draw:
    """Each record from one of `draws`, chosen uniformly."""

    def draw(rng: random.Random, split: str) -> dict:
        return draws[rng.randrange(len(draws))](rng, split)

    return draw


@dataclass(frozen=True)
class TaskDesign:
    """One evaluation task (see `tasks`): its name, type, ``seen``/``unseen`` group, the experts whose skills it
    needs, the longest generation, and which `Examples` methods draw its records."""

    name: str
    type: str
    group: str
    families: tuple[str, ...]
    kinds: tuple[str, ...]
    max_new_tokens: int = 1

    def drawer(self, examples: Examples) -> Draw:
        return mixture(*(getattr(examples, kind) for kind in self.kinds))


# Seen: one per expert, in its own format. Unseen: mixtures that no single expert covers, some in a format that no
# expert was trained on (syllable counts as multiple choice, stop words as generation).
TASKS: tuple[TaskDesign, ...] = (
    TaskDesign("gender", "multiple_choice", "seen", ("gender",), ("gender",)),
    TaskDesign("syllables", "generation", "seen", ("syllables",), ("syllables",), max_new_tokens=3),
    TaskDesign("stopword", "multiple_choice", "seen", ("stopword",), ("stopword",)),
    TaskDesign("code", "language_modeling", "seen", ("code",), ("code",)),
    TaskDesign("sotu", "language_modeling", "seen", ("sotu",), ("sotu",)),
    TaskDesign("moby_dick", "language_modeling", "seen", ("moby_dick",), ("moby_dick",)),
    TaskDesign("names_syllables", "multiple_choice", "unseen", ("gender", "syllables"),
               ("gender", "syllables_choice")),
    TaskDesign("stopword_gender", "multiple_choice", "unseen", ("stopword", "gender"), ("stopword", "gender")),
    TaskDesign("syllables_stopword", "generation", "unseen", ("syllables", "stopword"),
               ("syllables", "stopword_answer"), max_new_tokens=3),
    TaskDesign("prose", "language_modeling", "unseen", ("sotu", "moby_dick"), ("sotu", "moby_dick")),
)


def record_key(record: dict) -> str:
    """What makes two records the same example: the prompt, or the text."""
    return record.get("prompt", record.get("text", ""))


def draw_split(design: TaskDesign, examples: Examples, seed: int, split: str, size: int) -> list[dict]:
    """`size` records of `design` with distinct prompts (texts), from `split`'s pool, on the task's own RNG stream.

    Raises:
        RuntimeError: the pool is too small for `size` distinct records.
    """
    rng = random.Random(f"evox-merge-smollm2:{seed}:{design.name}:{split}")
    draw = design.drawer(examples)
    seen: set[str] = set()
    records: list[dict] = []
    for _ in range(50 * size):
        if len(records) == size:
            break
        record = draw(rng, split)
        if record_key(record) not in seen:
            seen.add(record_key(record))
            records.append(record)
    if len(records) < size:
        raise RuntimeError(f"task {design.name!r}: cannot draw {size} distinct {split} records")
    return records
