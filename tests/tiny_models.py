"""A tiny random merging setup built in seconds: a Qwen2 decoder, a character tokenizer, LoRA experts, tasks.

Used by the tests and by examples that must run anywhere. The weights are random, so the scores mean nothing;
for a real merging problem use the offline zoo (`evox_merge.zoo`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from evox_merge.zoo.char_tokenizer import build_char_tokenizer
from evox_merge.tasks import TaskSpec

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# (rank, alpha, rsLoRA, target modules) per expert: ranks, scalings and targets all differ somewhere.
EXPERT_SHAPES = [
    (4, 8, False, ["q_proj", "v_proj"]),
    (8, 16, False, ["q_proj", "v_proj", "up_proj", "down_proj"]),
    (2, 4, True, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (8, 8, False, ["v_proj", "gate_proj"]),
    (4, 16, True, ["q_proj", "v_proj", "down_proj"]),
    (6, 12, False, ATTENTION + MLP),
    (4, 4, False, ["o_proj", "up_proj"]),
    (8, 32, False, ["q_proj", "v_proj"]),
]


@dataclass
class TinySetup:
    """Paths of a built tiny setup."""

    base_dir: Path
    adapter_dirs: list[Path]
    tasks: list[TaskSpec]


def tiny_config(vocab_size: int, hidden_size: int = 64, layers: int = 2) -> Qwen2Config:
    """A small Qwen2 config (hidden 64, 2 layers, 4 heads, 2 KV heads by default)."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def build_tiny_setup(
    out_dir: str | Path, num_experts: int = 4, seed: int = 0, hidden_size: int = 64, examples: int = 12
) -> TinySetup:
    """Write a random base model, `num_experts` random LoRA adapters and three small tasks under `out_dir`."""
    if not 2 <= num_experts <= len(EXPERT_SHAPES):
        raise ValueError(f"num_experts must be in [2, {len(EXPERT_SHAPES)}], got {num_experts}")
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    model = Qwen2ForCausalLM(tiny_config(len(tokenizer), hidden_size))
    base_dir = out_dir / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    adapter_dirs = []
    for index, (rank, alpha, rslora, targets) in enumerate(EXPERT_SHAPES[:num_experts]):
        config = LoraConfig(
            r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, init_lora_weights=False
        )
        peft_model = get_peft_model(model, config)
        peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
        adapter_dir = out_dir / f"expert_{index}"
        peft_model.save_pretrained(adapter_dir)
        adapter_dirs.append(adapter_dir)
        model = peft_model.unload()
    return TinySetup(base_dir, adapter_dirs, write_tiny_tasks(out_dir / "tasks", seed, examples))


def _tiny_records(rng: random.Random, examples: int) -> dict[str, list[dict]]:
    words = []
    while len(words) < examples:  # no palindromes: a word and its reverse are two distinct choices
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6)))
        if word != word[::-1]:
            words.append(word)
    return {
        "choice": [{"prompt": f"rev {w}:", "choices": [w[::-1], w, w.upper()], "answer": 0} for w in words],
        "copy": [{"prompt": f"copy {w}=", "answer": w} for w in words],
        "text": [{"text": f"the word {w} backwards is {w[::-1]}."} for w in words],
    }


def write_tiny_tasks(out_dir: str | Path, seed: int = 0, examples: int = 12) -> list[TaskSpec]:
    """Three small tasks (multiple choice, generation, language modelling) over random letter strings, each with
    a validation file and a test file of other words."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split in ("validation", "test"):
        for name, records in _tiny_records(rng, examples).items():
            with open(out_dir / f"{name}_{split}.jsonl", "w") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in records)

    def paths(name: str) -> dict[str, str]:
        return {"path": str(out_dir / f"{name}_validation.jsonl"), "test_path": str(out_dir / f"{name}_test.jsonl")}

    return [
        TaskSpec(name="choice", type="multiple_choice", **paths("choice")),
        TaskSpec(name="copy", type="generation", max_new_tokens=8, **paths("copy")),
        TaskSpec(name="text", type="language_modeling", **paths("text")),
    ]


# Which parameters each dense test expert changes (regular expressions; None: every parameter).
DENSE_CHANGES = (None, r"mlp|norm", r"self_attn|embed_tokens")


def write_dense_experts(base_dir: str | Path, out_dir: str | Path, count: int = 3, seed: int = 0,
                        scale: float = 0.05) -> list[Path]:
    """Write `count` full models "fine-tuned" from the base at `base_dir`: each adds seeded Gaussian noise to the
    parameters `DENSE_CHANGES` names (the third is saved in shards), with the base's tokenizer beside it."""
    import re

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    auto = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(base_dir).is_encoder_decoder else AutoModelForCausalLM
    paths = []
    for index in range(count):
        model = auto.from_pretrained(base_dir)
        generator = torch.Generator().manual_seed(seed * 100 + index)
        pattern = DENSE_CHANGES[index % len(DENSE_CHANGES)]
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if pattern is None or re.search(pattern, name):
                    parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
        path = out_dir / f"dense_{index}"
        model.save_pretrained(path, max_shard_size="100KB" if index == 2 else "5GB")
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def build_tiny_t5_setup(out_dir: str | Path, seed: int = 0, examples: int = 12) -> TinySetup:
    """A random tiny T5 (encoder-decoder) base over the character tokenizer, two real PEFT LoRA experts on its
    attention (q, v) and feed-forward (wi, wo) layers, and the three small tasks."""
    from transformers import T5Config, T5ForConditionalGeneration

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, feed_forward_proj="relu")
    model = T5ForConditionalGeneration(config)
    base_dir = out_dir / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    adapter_dirs = []
    for index, targets in enumerate([["q", "v"], ["q", "wi", "wo"]]):
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False))
        peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
        adapter_dir = out_dir / f"expert_{index}"
        peft_model.save_pretrained(adapter_dir)
        adapter_dirs.append(adapter_dir)
        model = peft_model.unload()
    return TinySetup(base_dir, adapter_dirs, write_tiny_tasks(out_dir / "tasks", seed, examples))
