"""Shared prefixes: the tokens every sequence of a task starts with, run once per candidate and continued from.

Few-shot evaluation sets put the same demonstrations before every example. A scorer finds the longest common
*token* prefix of its tokenised rows (BOS included, so it is exact whatever the tokenizer does at the boundary:
the rows are cut where their token ids stop agreeing, not where the strings do), runs those tokens through the
model once per candidate, and continues every row of every batch from that KV cache, expanded over the batch.
Positions and attention masks continue from the prefix: a row's suffix starts at position ``length``, and its
attention mask is ``length`` ones followed by the batch's own (left- or right-padded) mask.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer


def cache_argument(model: PreTrainedModel) -> str:
    """The name under which this transformers version passes the KV cache (``cache`` since 5.x); a PEFT model
    passes it through to its base model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


# Below this many shared tokens the extra forward pass per candidate costs about what it saves: scorers keep the
# plain path (the zoo's own tasks share only "BOS + task name", 3 to 8 tokens).
MIN_SHARED_PREFIX = 16


def common_prefix_length(sequences: Sequence[Sequence[int]], keep: int = 1) -> int:
    """How many leading tokens every sequence shares, at most the shortest's length minus `keep` (so every row
    keeps `keep` tokens of its own after the prefix)."""
    if not sequences:
        return 0
    first = sequences[0]
    length = max(0, min(len(s) for s in sequences) - keep)
    for sequence in sequences[1:]:
        same = 0
        while same < length and sequence[same] == first[same]:
            same += 1
        length = same
        if length == 0:
            break
    return length


@dataclass
class PrefixState:
    """A shared prefix run under one or more candidates' weights.

    Attributes:
        keys_values: per layer, ``(keys, values)`` of shape ``(copies, heads, length, head_dim)``.
        states: ``(copies, length, ...)``, where asked for (language modelling scores the prefix's own tokens):
            what `evox_merge.tasks.logprobs.TokenLogprobs.states` gives for every prefix position.
    """

    keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    states: torch.Tensor | None

    @property
    def length(self) -> int:
        return self.keys_values[0][0].shape[-2]

    def cache(self, rows_per_copy: int) -> DynamicCache:
        """A fresh KV cache holding the prefix for ``copies * rows_per_copy`` rows (copy-major: rows
        ``p * rows_per_copy ...`` continue copy ``p``'s prefix); the model's updates never touch this state."""

        def expand(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.unsqueeze(1).expand(-1, rows_per_copy, *tensor.shape[1:]).flatten(0, 1)

        return DynamicCache([(expand(keys), expand(values)) for keys, values in self.keys_values])

    def mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The batch's ``(rows, L)`` attention mask with the prefix's ``length`` ones in front."""
        return torch.cat([attention_mask.new_ones(attention_mask.shape[0], self.length), attention_mask], dim=1)


@dataclass
class SharedPrefix:
    """The token ids every row of a task starts with (``ids (1, length)``, on the scoring device)."""

    ids: torch.Tensor

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    @classmethod
    def of(
        cls, sequences: Sequence[Sequence[int]], minimum: int | None, device, keep: int = 1, shared_next: bool = False
    ) -> "SharedPrefix | None":
        """The shared prefix of `sequences`, leaving `keep` tokens of each row after it (and, with `shared_next`,
        followed by a token every row shares too); None when it is shorter than `minimum` (None: never share)."""
        if minimum is None:
            return None
        length = common_prefix_length(sequences, keep)
        if shared_next:
            length = min(length, common_prefix_length(sequences, 0) - 1)
        if length < max(1, minimum):
            return None
        return cls(torch.tensor([list(sequences[0][:length])], dtype=torch.long, device=device))

    @torch.no_grad()
    def run(self, model: PreTrainedModel, copies: int = 1, tokens=None) -> PrefixState:
        """The prefix through `model` once per copy (each copy a candidate, see `evox_merge.experts.rows`); with
        `tokens` (a `TokenLogprobs` of `model`) its states at every prefix position too."""
        attention = getattr(model.config, "_attn_implementation", None) or "eager"
        if attention not in ("sdpa", "eager"):
            raise NotImplementedError(
                f"shared prefixes are built for sdpa and eager attention (padding inside the sequence, a 4D mask "
                f"for multiple choice); this model uses {attention!r}: build its scorers with min_shared_prefix=None"
            )
        if tokens is not None:
            states, output = tokens.states(input_ids=self.ids.expand(copies, -1), use_cache=True)
        else:
            states, output = None, model(input_ids=self.ids.expand(copies, -1), use_cache=True, logits_to_keep=1)
        cache = getattr(output, cache_argument(model))
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            raise NotImplementedError(
                f"shared prefixes need a plain dynamic KV cache; this model's has {type(cache.layers[0]).__name__} "
                "layers (sliding-window attention?): build its scorers with min_shared_prefix=None"
            )
        return PrefixState([(layer.keys, layer.values) for layer in cache.layers], states)
