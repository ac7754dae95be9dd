"""The ``t5`` zoo preset: the paper's FLAN-T5 setting in miniature, built offline in minutes.

arXiv 2605.29295 (Table 2) merges eight FLAN-T5-base experts, each *fully* fine-tuned on one GLUE task. Here:

* a small T5 (encoder-decoder) over the character tokenizer, trained from random initialisation on a mixture of
  every task family on short inputs (5-6 letters), long enough to be a strong generalist there (as FLAN-T5 is the
  paper's strong shared starting point);
* six experts, each the whole base fine-tuned (every parameter: dense experts, `evox_merge.experts.dense`) briefly,
  at a low learning rate, on one GLUE-like classification family on longer inputs (5-10 letters), so each task
  vector is small (`replay_fraction` mixes in rows of the other families; 0 by default);
* seen tasks (one per family, the paper's seen-task multi-task merging) and unseen ones: mixtures of two families
  and of all six, each example in its own family's format, so no single expert holds every skill a task needs.

Every task is multiple choice over its family's label words (T5's text-to-text classification), with disjoint
validation and test splits whose prompts never appear in training. The families are synthetic, over random
letter strings, each a stand-in for a GLUE task's shape (text in, one of two label words out).
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from evox_merge.tasks import TaskSpec
from evox_merge.zoo.lm_training import learning_rate

LETTERS = string.ascii_lowercase[:12]  # a small alphabet: squares and palindromes are not vanishingly rare


@dataclass(frozen=True)
class Classifier:
    """One GLUE-like family: ``tag:input`` -> one of `labels`, drawn balanced over the labels.

    Attributes:
        draw: ``(rng, length, label index)`` -> an input string of about that length with that label.
        shortest, longest: input lengths of the tasks and the experts' training; base_longest: of the base's.
    """

    name: str
    tag: str
    labels: tuple[str, str]
    draw: Callable[[random.Random, int, int], str]
    shortest: int = 5
    longest: int = 10
    base_longest: int = 6

    def record(self, rng: random.Random, for_base: bool = False) -> dict:
        label = rng.randrange(len(self.labels))
        text = self.draw(rng, rng.randint(self.shortest, self.base_longest if for_base else self.longest), label)
        return {"prompt": f"{self.tag}:{text}", "choices": list(self.labels), "answer": label}


def _word(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(length))


def _majority(first: str, second: str) -> Callable[[random.Random, int, int], str]:
    """A drawer of words with more letters from `first` than from `second` (label 0) or not, at the boundary:
    floor(n/2) + 1 letters from `first` or floor(n/2), shuffled."""

    def draw(rng: random.Random, length: int, label: int) -> str:
        count = length // 2 + 1 if label == 0 else length // 2
        letters = [rng.choice(first) for _ in range(count)] + [rng.choice(second) for _ in range(length - count)]
        rng.shuffle(letters)
        return "".join(letters)

    return draw


def _palindrome(rng: random.Random, length: int, label: int) -> str:
    while True:
        half = _word(rng, (length + 1) // 2)
        word = half + half[: length // 2][::-1] if label == 0 else _word(rng, length)
        if (word == word[::-1]) == (label == 0):
            return word


def _square(rng: random.Random, length: int, label: int) -> str:
    """A word made of one half written twice (label 0) or a random word of the same even length that is not."""
    while True:
        half = _word(rng, max(2, length // 2))
        word = half + half if label == 0 else _word(rng, 2 * len(half))
        if (word[: len(half)] == word[len(half):]) == (label == 0):
            return word


# Each family counts letters of one class against another or checks a symmetry: evidence that a small T5 trained on
# short words (5-6 letters) does not carry over fully to longer ones (up to 10), so each expert has something to
# learn; positional families (the first letter is a vowel, ...) were tried and dropped, as the base already solved
# them at every length (benchmarks/results/zoo_t5.md). The labels are different words per family, as in GLUE.
FAMILIES: dict[str, Classifier] = {c.name: c for c in [
    Classifier("vowels", "vw", ("more", "fewer"), _majority("aeiou", "bcdfghjklmnp")),
    Classifier("palindrome", "pa", ("entailed", "not"), _palindrome),
    Classifier("early_majority", "em", ("early", "late"), _majority("abcdef", "ghijkl")),
    Classifier("square", "sq", ("same", "different"), _square),
    Classifier("odd_majority", "om", ("odd", "even"), _majority("acegik", "bdfhjl")),
    Classifier("blocks", "bl", ("inside", "outside"), _majority("abcghi", "defjkl")),
]}
MIXTURES = (("vowels", "palindrome"), ("early_majority", "square"), ("odd_majority", "blocks"))


@dataclass(frozen=True)
class T5Preset:
    """Settings that decide the ``t5`` zoo's bytes besides the seed (see the module docstring)."""

    name: str = "t5"
    d_model: int = 96
    d_ff: int = 384
    num_layers: int = 3
    num_heads: int = 4
    d_kv: int = 24
    base_steps: int = 1200
    base_batch_size: int = 64
    base_lr: float = 1e-3
    expert_steps: int = 300
    expert_batch_size: int = 64
    expert_lr: float = 1e-4
    replay_fraction: float = 0.0
    validation_size: int = 100
    test_size: int = 500

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "families": {name: list(c.labels) for name, c in FAMILIES.items()}}


T5 = T5Preset()


def task_designs() -> list[tuple[str, str, tuple[str, ...]]]:
    """``(task name, group, families)`` of every task: one seen task per family, then the unseen mixtures."""
    seen = [(name, "seen", (name,)) for name in FAMILIES]
    unseen = [(f"mix_{a}_{b}", "unseen", (a, b)) for a, b in MIXTURES]
    return seen + unseen + [("mix_all", "unseen", tuple(FAMILIES))]


def _draw_mixture(families: tuple[str, ...]) -> Callable[[random.Random], dict]:
    return lambda rng: FAMILIES[families[rng.randrange(len(families))]].record(rng)


def write_tasks(root: Path, settings: T5Preset, seed: int) -> tuple[list[dict], list[dict], set[str]]:
    """Every task's validation and test files (distinct prompts); the seen and unseen specs and all prompts."""
    specs: dict[str, list[dict]] = {"seen": [], "unseen": []}
    prompts: set[str] = set()
    for name, group, families in task_designs():
        rng = random.Random(f"evox-merge-zoo-t5:{seed}:{name}")
        draw, records, seen_here = _draw_mixture(families), [], set()
        while len(records) < settings.validation_size + settings.test_size:
            record = draw(rng)
            if record["prompt"] not in seen_here:
                seen_here.add(record["prompt"])
                records.append(record)
        folder = root / "tasks" / name
        folder.mkdir(parents=True)
        for split, part in (("validation", records[: settings.validation_size]),
                            ("test", records[settings.validation_size:])):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        prompts |= seen_here
        specs[group].append(TaskSpec(name=name, type="multiple_choice", path=f"tasks/{name}/validation.jsonl",
                                     test_path=f"tasks/{name}/test.jsonl").to_dict())
    return specs["seen"], specs["unseen"], prompts


def _batch(records: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    sources = tokenizer([r["prompt"] for r in records], add_special_tokens=True)["input_ids"]  # ends with EOS
    targets = tokenizer([r["choices"][r["answer"]] for r in records], add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    width_s, width_t = max(map(len, sources)), max(map(len, targets)) + 1
    input_ids = torch.full((len(records), width_s), pad, dtype=torch.long)
    labels = torch.full((len(records), width_t), -100, dtype=torch.long)
    for row, (source, target) in enumerate(zip(sources, targets)):
        input_ids[row, : len(source)] = torch.tensor(source)
        labels[row, : len(target) + 1] = torch.tensor(target + [eos])
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad).long(), "labels": labels}


def train_seq2seq(model, draw: Callable[[random.Random], dict], rng: random.Random, held_out: set[str], tokenizer,
                  steps: int, batch_size: int, lr: float, description: str, progress: bool) -> float:
    """AdamW on every parameter (cross-entropy of the label word and EOS), warm-up then cosine decay, gradient
    norm clipped at 1; never a prompt in `held_out`. Returns the mean loss of the last 10% of steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    tail, losses = max(1, steps // 10), []
    model.train()
    for step in tqdm(range(steps), desc=description, unit="step", disable=not progress, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        records = []
        while len(records) < batch_size:
            record = draw(rng)
            if record["prompt"] not in held_out:
                records.append(record)
        loss = model(**_batch(records, tokenizer)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= steps - tail:
            losses.append(loss.item())
    model.eval()
    return sum(losses) / len(losses)


def build_t5_into(root: Path, settings: T5Preset, seed: int, progress: bool) -> dict[str, Any]:
    """Write the ``t5`` zoo's tasks, base and dense experts into `root`; returns the manifest's content (the
    caller adds scores and writes it)."""
    import copy

    from transformers import T5Config, T5ForConditionalGeneration

    from evox_merge.zoo.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer(append_eos=True)  # like T5's: the encoder sees where its input ends
    seen, unseen, held_out = write_tasks(root, settings, seed)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=settings.d_model, d_ff=settings.d_ff, d_kv=settings.d_kv,
                      num_layers=settings.num_layers, num_heads=settings.num_heads, feed_forward_proj="relu",
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, dropout_rate=0.0)
    base = T5ForConditionalGeneration(config)
    names = tuple(FAMILIES)

    def base_draw(rng: random.Random) -> dict:
        return FAMILIES[names[rng.randrange(len(names))]].record(rng, for_base=True)

    losses = {"base": train_seq2seq(base, base_draw, random.Random(f"evox-merge-zoo-t5:{seed}:base"), held_out,
                                    tokenizer, settings.base_steps, settings.base_batch_size, settings.base_lr,
                                    "base model", progress)}
    base.name_or_path = base.config.name_or_path = "base"
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for index, name in enumerate(names):
        torch.manual_seed(seed * 1000 + index + 1)
        expert = copy.deepcopy(base)
        others = tuple(n for n in names if n != name)

        def draw(rng: random.Random, name=name, others=others) -> dict:
            if rng.random() < settings.replay_fraction:
                return FAMILIES[others[rng.randrange(len(others))]].record(rng)
            return FAMILIES[name].record(rng)

        losses[name] = train_seq2seq(expert, draw, random.Random(f"evox-merge-zoo-t5:{seed}:expert:{name}"),
                                     held_out, tokenizer, settings.expert_steps, settings.expert_batch_size,
                                     settings.expert_lr, f"expert {name}", progress)
        expert.save_pretrained(root / "experts" / name)
        tokenizer.save_pretrained(root / "experts" / name)
        (root / "experts" / name / "README.md").write_text(
            f"# {name}\n\nevox-merge offline zoo (preset t5, seed {seed}): the base fully fine-tuned on the "
            f"`{name}` family ({settings.expert_steps} steps at learning rate {settings.expert_lr:g}, "
            f"{settings.replay_fraction:.0%} replay of the other families). A dense expert: merge it with "
            "`experts: [.../experts/<name>, ...]`.\n")
        del expert
    designs = {name: {"group": group, "type": "multiple_choice", "families": list(families)}
               for name, group, families in task_designs()}
    return {"specs": (seen, unseen), "experts": list(names), "tasks": designs,
            "training_loss": {k: round(v, 6) for k, v in losses.items()}}
