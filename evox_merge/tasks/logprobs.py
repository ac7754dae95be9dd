"""Token log-probabilities without a batch's full-vocabulary logits.

A scorer needs, per scored position, one number: the log-probability of one token. Asking the model for its logits
materialises ``(rows, positions, vocabulary)`` of them (and their log-softmax): with a 128k-token vocabulary that,
not the model, is what runs out of memory first. `TokenLogprobs` instead runs the model's body for its last hidden
states and applies the output layer chunk by chunk (at most `CHUNK_ELEMENTS` logits at a time): a running
logsumexp over vocabulary chunks and the target token's logit picked from its chunk, so the log-probability is
``logit[target] - logsumexp(logits)`` computed from the very logits the full path would see.

The model's forward is not reimplemented: the output layer is applied as the model applies it (a hidden-state
scale for T5 with tied embeddings, a final soft cap for Gemma-style models), and for each model the first use
checks on a few tokens that body + head give the model's own logits. A model for which they do not (an unknown
post-processing, a hooked or adapted output layer) is scored through its full logits, as before, with one warning.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 22
"""Logits computed at once on a CPU (positions x vocabulary chunk): 16 MiB in float32, small enough to stay in cache
(measured on a 2-core Xeon: 1.85 s for 4096 positions x 49,152 entries against 2.4 s at 64 MiB and 2.4 s for the
full logits); a GPU takes 16x as many at once."""
VOCAB_CHUNK = 1 << 13
"""Vocabulary entries per chunk on a CPU (16x on a GPU)."""
_CHECK_TOKENS = 4
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class OutputHead:
    """The output layer as the model applies it: ``softcap(linear(hidden * scale))``."""

    linear: torch.nn.Linear
    scale: float | None = None
    softcap: float | None = None

    @classmethod
    def of(cls, model: PreTrainedModel) -> "OutputHead | None":
        """The head of `model`, or None where it is not a plain, unhooked Linear."""
        linear = model.get_output_embeddings()
        if type(linear) is not torch.nn.Linear or linear._forward_hooks or linear._forward_pre_hooks:
            return None
        config = model.config
        scale = None
        if config.is_encoder_decoder and getattr(config, "model_type", "") in ("t5", "mt5", "umt5"):
            scale = config.d_model ** -0.5 if config.tie_word_embeddings else None
        return cls(linear, scale, getattr(config, "final_logit_softcapping", None))

    def logits(self, hidden: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Float32 logits of vocabulary entries ``start:stop`` for ``hidden (n, d)``."""
        if self.scale is not None:
            hidden = hidden * self.scale
        bias = self.linear.bias[start:stop] if self.linear.bias is not None else None
        logits = torch.nn.functional.linear(hidden, self.linear.weight[start:stop], bias).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``log_softmax(logits)[target]`` float32 for ``hidden (..., d)`` and ``targets (...)``, never holding
        more than `CHUNK_ELEMENTS` logits."""
        shape = targets.shape
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        vocabulary = self.linear.weight.shape[0]
        scale = 16 if hidden.is_cuda else 1
        width = min(vocabulary, VOCAB_CHUNK * scale)
        step = max(1, CHUNK_ELEMENTS * scale // width)
        out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        for first in range(0, targets.numel(), step):
            rows, wanted = hidden[first : first + step], targets[first : first + step]
            total = torch.full(wanted.shape, -torch.inf, device=hidden.device)
            picked = torch.zeros(wanted.shape, device=hidden.device)
            for start in range(0, vocabulary, width):
                logits = self.logits(rows, start, start + width)
                total = torch.logaddexp(total, logits.logsumexp(-1))
                inside = (wanted >= start) & (wanted < start + logits.shape[-1])
                index = (wanted - start).clamp(0, logits.shape[-1] - 1).unsqueeze(-1)
                picked = torch.where(inside, logits.gather(-1, index).squeeze(-1), picked)
            out[first : first + step] = picked - total
        return out.view(shape)


class TokenLogprobs:
    """A model's forward passes as scorers need them: `states` at the kept positions, then `logprobs` of tokens.

    With a checked `OutputHead` the states are last hidden states and log-probabilities come chunk by chunk;
    otherwise they are the model's logits and the log-softmax is taken whole (the path before this module).
    """

    def __init__(self, model: PreTrainedModel, copies: int = 1) -> None:
        # A PEFT model's adapters live inside its base model's modules: run that model's body and head.
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.head = _checked_head(self.model, copies)

    def states(self, keep: int | torch.Tensor | None = None, **inputs: Any) -> tuple[torch.Tensor, Any]:
        """Run the decoder-only model on `inputs` (as for ``model(**inputs)``) and return ``(states, output)``:
        the states at positions `keep` (None: all; an int: the last `keep`; a tensor: those positions) and the
        output (for its KV cache)."""
        if self.head is None:
            output = self.model(**inputs, logits_to_keep=0 if keep is None else keep)
            return output.logits, output
        output = self.model.base_model(**inputs)
        hidden = output.last_hidden_state
        if keep is None:
            return hidden, output
        return (hidden[:, -keep:] if isinstance(keep, int) else hidden[:, keep]), output

    def logprobs(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Float32 log-probability of each target token ``(...)`` from the states ``(..., d or vocabulary)``."""
        return token_logprobs(self.head, states, targets)


def token_logprobs(head: OutputHead | None, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Float32 log-probability of each target token ``(...)``: from hidden states through `head` chunk by chunk,
    or (no head) from the model's logits ``(..., vocabulary)`` whole."""
    if head is None:
        return torch.log_softmax(states.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return head.token_logprobs(states, targets)


def decoder_states(model: PreTrainedModel, head: OutputHead | None, **inputs: Any) -> torch.Tensor:
    """An encoder-decoder model's decoder states for ``model(**inputs)`` with ``encoder_outputs``: last hidden
    states of its decoder when `head` is given, else the model's logits."""
    if head is None:
        return model(**inputs).logits
    return model.get_decoder()(
        input_ids=inputs["decoder_input_ids"], attention_mask=inputs["decoder_attention_mask"],
        encoder_hidden_states=inputs["encoder_outputs"][0], encoder_attention_mask=inputs["attention_mask"],
    ).last_hidden_state


def checked_seq2seq_head(model: PreTrainedModel) -> OutputHead | None:
    """`OutputHead.of` an encoder-decoder model, once checked against its logits on a few tokens (see module)."""
    return _checked_head(model, 1)


@torch.no_grad()
def _checked_head(model: PreTrainedModel, copies: int) -> OutputHead | None:
    """`OutputHead.of(model)` if body + head reproduce the model's logits on a few tokens (checked once per model,
    with `copies` rows so that a several-candidates-per-pass context sees the row count it expects)."""
    if model in _CHECKED:
        return _CHECKED[model]
    head = OutputHead.of(model)
    if head is not None:
        device = head.linear.weight.device
        ids = torch.arange(_CHECK_TOKENS, device=device).remainder(head.linear.weight.shape[0]).expand(copies, -1)
        try:
            if model.config.is_encoder_decoder:
                inputs = {"encoder_outputs": (model.get_encoder()(input_ids=ids).last_hidden_state,),
                          "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids,
                          "decoder_attention_mask": torch.ones_like(ids)}
                hidden = decoder_states(model, head, **inputs)
            else:
                inputs = {"input_ids": ids}
                hidden = model.base_model(**inputs).last_hidden_state if model.base_model is not model else None
            reference = model(**inputs).logits.float()
        except (AttributeError, TypeError, ValueError):  # a wrapper (e.g. a PEFT model) without the plain body
            hidden = None
        # The same matmul of the same states, maybe reduced in another order for another shape: a few units in the
        # last place of the model's dtype (bfloat16's is 2**-7 of the logits' scale), never more than 1e-4.
        tolerance = max(1e-4, 4 * torch.finfo(head.linear.weight.dtype).eps)
        matches = hidden is not None and hidden.shape[:-1] == reference.shape[:-1] and torch.allclose(
            head.logits(hidden.reshape(-1, hidden.shape[-1])).view(reference.shape), reference, rtol=0,
            atol=tolerance * max(1.0, float(reference.abs().max())))
        if not matches:
            logger.warning("%s: its output layer is not a plain linear head (or adds post-processing this check does "
                           "not know); scoring holds full-vocabulary logits for it", type(model).__name__)
            head = None
    _CHECKED[model] = head
    return head
