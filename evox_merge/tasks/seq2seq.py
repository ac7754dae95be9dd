"""Scoring encoder-decoder models (T5 family, ``AutoModelForSeq2SeqLM``) on the same three task types.

* Multiple choice: the encoder reads each prompt once; its states are repeated over the example's choices and the
  decoder scores every choice in one pass (summed log-likelihood of the choice's tokens, teacher-forced from the
  decoder start token); ``accuracy`` or ``accuracy_norm`` as for decoder-only models.
* Generation: greedy decoding from the encoded prompt (transformers' ``generate`` with the encoder run once and
  the decoder's KV cache), cut at the first stop string or EOS, scored by exact match.
* Language modelling: the decoder's mean per-token NLL of each text, with the spec's ``prefix`` (or nothing but
  the tokenizer's end-of-sequence token) as the encoder's input.

The batching rules are the decoder-only scorers' (`evox_merge.tasks.scoring`): tokenised once when built, rows
sorted by length into batches of at most ``batch_size`` scored sequences, a batch that runs out of memory halved
and retried. Shared prompt prefixes are not run once here (the encoder reads every prompt whole), and several
candidates per forward pass (``candidates_per_pass``) are decoder-only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from evox_merge.tasks import Task
from evox_merge.tasks.batching import IGNORE, encode
from evox_merge.tasks.generation import cut_at_stop
from evox_merge.tasks.logprobs import checked_seq2seq_head, decoder_states, token_logprobs
from evox_merge.tasks.scoring import ChoiceAnswers, CompletionAnswers, normalize_answer, pad_token_id, run_batches
from evox_merge.util.errors import TaskFormatError


@dataclass
class Seq2SeqBatch:
    """Encoder inputs and teacher-forced decoder targets.

    Attributes:
        input_ids: ``(B, Ls)`` right-padded encoder inputs; attention_mask: ``(B, Ls)``.
        decoder_input_ids: ``(B, K, Lt)``: K target sequences per encoder row (an example's choices; 1 for language
            modelling), each the decoder start token then the target's tokens but the last, right-padded.
        labels: ``(B, K, Lt)`` the target tokens, ``IGNORE`` on padding.
        rows: ``(B,)`` the examples' indices in the task's order.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    decoder_input_ids: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor

    def split(self) -> tuple["Seq2SeqBatch", "Seq2SeqBatch"]:
        half = (self.rows.numel() + 1) // 2
        parts = [self.input_ids, self.attention_mask, self.decoder_input_ids, self.labels, self.rows]
        return Seq2SeqBatch(*(t[:half] for t in parts)), Seq2SeqBatch(*(t[half:] for t in parts))


def _start_id(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    start = config.decoder_start_token_id
    return start if start is not None else (config.pad_token_id or 0)


def seq2seq_batches(examples: list[tuple[list[int], list[list[int]]]], pad_id: int, start_id: int, batch_size: int,
                    device) -> list[Seq2SeqBatch]:
    """Cut ``(encoder ids, [target ids, ...])`` examples, sorted by length, into batches of at most `batch_size`
    target sequences."""
    def size(i: int) -> tuple[int, int]:
        source, targets = examples[i]
        return len(source), max(len(t) for t in targets)

    order = sorted(range(len(examples)), key=size, reverse=True)
    most = max(len(targets) for _, targets in examples)
    per_batch = max(1, batch_size // most)
    batches = []
    for begin in range(0, len(order), per_batch):
        chunk = order[begin: begin + per_batch]
        source_length = max(size(i)[0] for i in chunk)
        target_length = max(size(i)[1] for i in chunk)
        input_ids = torch.full((len(chunk), source_length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), source_length), dtype=torch.long)
        decoder = torch.full((len(chunk), most, target_length), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), most, target_length), IGNORE, dtype=torch.long)
        for b, row in enumerate(chunk):
            source, targets = examples[row]
            input_ids[b, : len(source)] = torch.tensor(source)
            mask[b, : len(source)] = 1
            for k, target in enumerate(targets):
                labels[b, k, : len(target)] = torch.tensor(target)
                decoder[b, k, : len(target)] = torch.tensor([start_id, *target[:-1]])
        batches.append(Seq2SeqBatch(input_ids.to(device), mask.to(device), decoder.to(device), labels.to(device),
                                    torch.tensor(chunk)))
    return batches


@torch.no_grad()
def target_logprobs(model: PreTrainedModel, batch: Seq2SeqBatch) -> torch.Tensor:
    """``(B, K)`` float64: each target's summed log-probability given its encoder input."""
    rows, targets, length = batch.labels.shape
    encoded = model.get_encoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    hidden = encoded.last_hidden_state.repeat_interleave(targets, dim=0)
    labels = batch.labels.reshape(rows * targets, length)
    head = checked_seq2seq_head(model)
    states = decoder_states(model, head, encoder_outputs=(hidden,),
                            attention_mask=batch.attention_mask.repeat_interleave(targets, dim=0),
                            decoder_input_ids=batch.decoder_input_ids.reshape(rows * targets, length),
                            decoder_attention_mask=(labels != IGNORE).long())
    scored = labels != IGNORE
    picked = token_logprobs(head, states, labels.clamp(min=0))
    return torch.where(scored, picked, 0.0).double().sum(-1).view(rows, targets)


def _encoder_inputs(task: Task, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each example's prompt as the encoder reads it; a prompt that tokenises to nothing is refused, as the
    decoder-only scorers refuse it (`evox_merge.tasks.batching.check_lengths` names its file and line first)."""
    prompts = [encode(tokenizer, record["prompt"], special=True) for record in task.records]
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise TaskFormatError(f"task {task.name!r}, example {index}: the prompt tokenises to nothing; a prompt "
                                  "needs at least one token for the encoder to read")
    return prompts


class _Seq2SeqScorer:
    def scores(self, model: PreTrainedModel, copies: int = 1) -> list[float]:
        if copies != 1:
            raise ValueError("several candidates per pass are decoder-only; score encoder-decoder models one at a time")
        return [self.score(model)]

    def score(self, model: PreTrainedModel) -> float:
        numerators, denominators = self.example_parts(model)
        value = float(numerators.sum() / denominators.sum())
        return value if math.isfinite(value) else math.nan


class Seq2SeqMultipleChoiceScorer(ChoiceAnswers, _Seq2SeqScorer):
    """Multiple choice for encoder-decoder models (module docstring)."""

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device, start_id: int) -> None:
        self.task = task
        examples = []
        for index, (record, prompt) in enumerate(zip(task.records, _encoder_inputs(task, tokenizer))):
            choices = [encode(tokenizer, choice, special=False) for choice in record["choices"]]
            if not all(choices):
                raise TaskFormatError(f"task {task.name!r}, example {index}, choices[{choices.index([])}]: tokenises "
                                      "to nothing; a choice needs at least one token to score")
            examples.append((prompt, choices))
        self.batches = seq2seq_batches(examples, pad_token_id(tokenizer), start_id, batch_size, device)
        self._prepare_answers(task)

    def choice_logprobs(self, model: PreTrainedModel) -> torch.Tensor:
        """``(examples, most choices)`` float64, -inf where an example has fewer choices."""
        out = torch.empty(self._choice_chars.shape, dtype=torch.float64)

        def run(batch: Seq2SeqBatch) -> None:
            out[batch.rows] = target_logprobs(model, batch).cpu()

        run_batches(self.batches, run)
        return out.masked_fill(~self.real_choices, -math.inf)


class Seq2SeqLanguageModelScorer(_Seq2SeqScorer):
    """Language modelling for encoder-decoder models (module docstring): minus the mean per-token NLL."""

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device, start_id: int) -> None:
        self.task = task
        source = encode(tokenizer, task.spec.prefix or "", special=True)
        if not source and tokenizer.eos_token_id is None:
            raise TaskFormatError(f"task {task.name!r}: the encoder input (the spec's prefix) tokenises to nothing "
                                  "and the tokenizer has no end-of-sequence token to stand for it")
        source = source or [tokenizer.eos_token_id]
        texts = []
        for index, record in enumerate(task.records):
            ids = encode(tokenizer, record["text"], special=False)
            if not ids:
                raise TaskFormatError(f"task {task.name!r}, example {index}: the text tokenises to nothing; a "
                                      "text needs at least one token to score")
            texts.append((source, [ids]))
        self.batches = seq2seq_batches(texts, pad_token_id(tokenizer), start_id, batch_size, device)
        self._counts = torch.tensor([len(ids[0]) for _, ids in texts], dtype=torch.float64)

    def example_parts(self, model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
        sums = torch.zeros(self._counts.numel(), dtype=torch.float64)

        def run(batch: Seq2SeqBatch) -> None:
            sums[batch.rows] = target_logprobs(model, batch)[:, 0].cpu()

        run_batches(self.batches, run)
        return sums, self._counts


class Seq2SeqGenerationScorer(CompletionAnswers, _Seq2SeqScorer):
    """Greedy generation scored by exact match, for encoder-decoder models (module docstring)."""

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device, start_id: int) -> None:
        self.task = task
        self.tokenizer = tokenizer
        prompts = _encoder_inputs(task, tokenizer)
        self.batches = seq2seq_batches([(p, [[0]]) for p in prompts], pad_token_id(tokenizer), start_id, batch_size,
                                       device)
        self.answers = [normalize_answer(record["answer"]) for record in task.records]
        self.generation = GenerationConfig(
            max_new_tokens=task.spec.max_new_tokens, do_sample=False, num_beams=1, decoder_start_token_id=start_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_token_id(tokenizer), output_scores=True,
            return_dict_in_generate=True)

    def completions(self, model: PreTrainedModel) -> list[str] | None:
        """Each example's completion cut at its first stop string; None if the logits were not finite."""
        texts: list[str] = [""] * len(self.answers)
        finite = True

        def run(batch: Seq2SeqBatch) -> None:
            nonlocal finite
            output = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    generation_config=self.generation)
            finite &= all(bool(torch.isfinite(step).all()) for step in output.scores)
            decoded = self.tokenizer.batch_decode(output.sequences[:, 1:], skip_special_tokens=True)
            for row, text in zip(batch.rows.tolist(), decoded):
                texts[row] = cut_at_stop(text, self.task.spec.stop)[0]

        run_batches(self.batches, run)
        return texts if finite else None


def build_seq2seq_scorer(task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, device, model_config):
    """The encoder-decoder scorer for the task's type."""
    scorer = {"generation": Seq2SeqGenerationScorer, "multiple_choice": Seq2SeqMultipleChoiceScorer}.get(
        task.spec.type, Seq2SeqLanguageModelScorer)
    return scorer(task, tokenizer, batch_size, device, _start_id(model_config))
