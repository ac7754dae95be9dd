"""The zoo's training loop: batches of ``prompt + answer + "\\n" + EOS`` with the loss on the answer only."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evox_merge.tasks.batching import IGNORE


@dataclass
class TrainingBatch:
    """Right-padded training sequences ``prompt + answer + "\\n" + EOS``.

    Attributes:
        input_ids, attention_mask: ``(B, L)`` long.
        labels: ``(B, L)`` long, the answer tokens; ``IGNORE`` on the prompt and the padding.
        replay: ``(B,)`` bool, rows drawn from the replay mixture rather than the main task.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    replay: torch.Tensor


class ExampleStream:
    """Endless training batches of generation records ``{"prompt", "answer"}``: each row from `draw`, or with
    probability `replay_fraction` from `replay_draw`; never a prompt in `held_out` (the evaluation splits)."""

    def __init__(
        self,
        draw: Callable[[random.Random], dict],
        rng: random.Random,
        tokenizer: PreTrainedTokenizerBase,
        held_out: set[str],
        replay_draw: Callable[[random.Random], dict] | None = None,
        replay_fraction: float = 0.0,
    ) -> None:
        self.draw = draw
        self.rng = rng
        self.tokenizer = tokenizer
        self.held_out = held_out
        self.replay_draw = replay_draw
        self.replay_fraction = replay_fraction if replay_draw is not None else 0.0

    def _record(self) -> tuple[dict, bool]:
        replay = self.rng.random() < self.replay_fraction
        draw = self.replay_draw if replay else self.draw
        while True:
            record = draw(self.rng)
            if record["prompt"] not in self.held_out:
                return record, replay

    def batch(self, size: int) -> TrainingBatch:
        """The next `size` rows."""
        records, replay = zip(*(self._record() for _ in range(size)))
        prompts = self.tokenizer([r["prompt"] for r in records], add_special_tokens=False)["input_ids"]
        answers = self.tokenizer([r["answer"] + "\n" for r in records], add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        width = max(len(p) + len(a) + 1 for p, a in zip(prompts, answers))
        input_ids = torch.full((size, width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((size, width), dtype=torch.long)
        labels = torch.full((size, width), IGNORE, dtype=torch.long)
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            ids = prompt + answer + [eos]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            labels[row, len(prompt) : len(ids)] = torch.tensor(answer + [eos])
        return TrainingBatch(input_ids, attention_mask, labels, torch.tensor(replay, dtype=torch.bool))


def batch_loss(model: PreTrainedModel, batch: TrainingBatch, anchor_weight: float) -> torch.Tensor:
    """Cross-entropy of the answer tokens. With `anchor_weight` > 0 (a PEFT model), replay rows are not fitted
    to their answers but anchored to the base: ``anchor_weight * KL(base || model)`` over their answer
    positions, so the adapter learns its own task while leaving the others' outputs as the base had them."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    targets = batch.labels[:, 1:]
    scored = targets != IGNORE  # (B, L-1)
    if anchor_weight <= 0 or not batch.replay.any():
        return torch.nn.functional.cross_entropy(logits[scored], targets[scored])
    own = scored & ~batch.replay[:, None]
    anchored = scored & batch.replay[:, None]
    loss = torch.nn.functional.cross_entropy(logits[own], targets[own]) if own.any() else logits.sum() * 0
    rows = batch.replay.nonzero().flatten()
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits
    base_logprobs = torch.log_softmax(base_logits[:, :-1][anchored[rows]], dim=-1)
    logprobs = torch.log_softmax(logits[anchored], dim=-1)
    kl = (base_logprobs.exp() * (base_logprobs - logprobs)).sum(-1).mean()
    return loss + anchor_weight * kl


def learning_rate(step: int, steps: int, peak: float, warmup_fraction: float = 0.1) -> float:
    """Linear warm-up to `peak` over the first `warmup_fraction` of the steps, then cosine decay to 0."""
    warmup = max(1, int(steps * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(
    model: PreTrainedModel,
    parameters: Iterable[torch.nn.Parameter],
    stream: ExampleStream,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    description: str,
    progress: bool,
    anchor_weight: float = 0.0,
) -> float:
    """Train `parameters` of `model` for `steps` AdamW steps (gradient norm clipped at 1) on `batch_loss`;
    returns the mean loss of the last 10% of steps. Leaves the model in eval mode."""
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    tail = max(1, steps // 10)
    tail_losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=description, unit="step", disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        loss = batch_loss(model, stream.batch(batch_size), anchor_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= steps - tail:
            tail_losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return sum(tail_losses) / len(tail_losses)
