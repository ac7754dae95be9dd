"""Seconds per candidate: MergeProblem.evaluate vs a PEFT weighted-adapter loop vs the base-model floor.

Measured side by side in one run on the same model, experts, task and population:
  (a) MergeProblem.evaluate(pop): in-place merge + batched scoring;
  (b) the loop a user would write with PEFT: per candidate add_weighted_adapter(cat), set_adapter, score,
      delete_adapter (all adapters loaded once, before timing);
  (c) the floor: the unmerged base model scoring the same data P times.

    python -m benchmarks.throughput [--population 16] [--repeats 3] [--out benchmarks/results/throughput.md]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from benchmarks.machine import machine_markdown
from evox_merge.char_tokenizer import DEFAULT_ALPHABET, build_char_tokenizer
from evox_merge.experts import ExpertSet
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.scoring import build_scorer
from evox_merge.tasks import TaskSpec, read_task

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def build_setup(root: Path, experts: int, rank: int, hidden: int, layers: int, texts: int, length: int, seed: int):
    """A random Qwen2 base of a few million parameters, `experts` random rank-`rank` LoRA adapters, one LM task."""
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64, max_position_embeddings=512,
    )
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapter_dirs = []
    for index in range(experts):
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                       init_lora_weights=False))
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.data.mul_(0.05)  # keep merged models in a sane range
        peft_model.save_pretrained(root / f"expert_{index}")
        adapter_dirs.append(root / f"expert_{index}")
        model = peft_model.unload()
    rng = random.Random(seed)
    letters = DEFAULT_ALPHABET[:62]
    task_path = root / "validation.jsonl"
    task_path.write_text("".join(
        '{"text": "' + "".join(rng.choice(letters) for _ in range(length - 1)) + '"}\n' for _ in range(texts)
    ))
    spec = TaskSpec(name="lm", type="language_modeling", path=str(task_path))
    return root / "base", adapter_dirs, spec, sum(p.numel() for p in model.parameters())


def time_calls(function, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return seconds


def peft_loop(peft_model, scorer, names: list[str], pop: torch.Tensor) -> list[float]:
    """What a user writes with PEFT: a weighted adapter per candidate, scored, then deleted."""
    scores = []
    for coefficients in pop.tolist():
        peft_model.add_weighted_adapter(names, coefficients, "candidate", combination_type="cat")
        peft_model.set_adapter("candidate")
        scores.append(scorer.score(peft_model))
        peft_model.delete_adapter("candidate")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        base_dir, adapter_dirs, spec, parameters = build_setup(
            Path(tmp), args.experts, args.rank, args.hidden, args.layers, args.texts, args.length, seed=0
        )
        experts = ExpertSet.load(base_dir, adapter_dirs)
        problem = MergeProblem(experts, [spec], batch_size=args.batch_size)
        pop = torch.rand(args.population, args.experts, generator=torch.Generator().manual_seed(0)) * 0.5
        task = read_task(spec)
        tokens = sum(len(experts.tokenizer(r["text"])["input_ids"]) for r in task.records)

        base_model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        base_scorer = build_scorer(task, experts.tokenizer, args.batch_size, "cpu")
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir), adapter_dirs[0], adapter_name="e0"
        ).eval()
        for index, path in enumerate(adapter_dirs[1:], start=1):
            peft_model.load_adapter(path, adapter_name=f"e{index}")
        names = [f"e{i}" for i in range(args.experts)]

        ours = problem.evaluate_per_task(pop)[:, 0].tolist()
        theirs = peft_loop(peft_model, base_scorer, names, pop)
        max_difference = max(abs(a - b) for a, b in zip(ours, theirs))

        timings = {"a": [], "b": [], "c": []}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits all three alike
            timings["a"] += time_calls(lambda: problem.evaluate(pop), 1)
            timings["b"] += time_calls(lambda: peft_loop(peft_model, base_scorer, names, pop), 1)
            timings["c"] += time_calls(lambda: [base_scorer.score(base_model) for _ in range(args.population)], 1)
        per_candidate = {k: statistics.median(v) / args.population for k, v in timings.items()}

    ratio_ac = per_candidate["a"] / per_candidate["c"]
    ratio_ba = per_candidate["b"] / per_candidate["a"]
    report = f"""# Throughput: seconds per candidate evaluation

Command: `python -m benchmarks.throughput --population {args.population} --repeats {args.repeats} --threads {args.threads}`

Setup: random Qwen2 base, hidden {args.hidden}, {args.layers} layers, {parameters / 1e6:.2f} M parameters;
{args.experts} LoRA experts of rank {args.rank} on {", ".join(TARGETS)}; one language-modelling validation task of
{args.texts} texts, {tokens} tokens in all (batch size {args.batch_size}); population P = {args.population};
median of {args.repeats} interleaved repeats.

| method | s / candidate |
| --- | --- |
| (a) `MergeProblem.evaluate` (in-place merge) | {per_candidate["a"]:.4f} |
| (b) PEFT loop (`add_weighted_adapter` cat, `set_adapter`, score, `delete_adapter`) | {per_candidate["b"]:.4f} |
| (c) floor: base model alone, same data | {per_candidate["c"]:.4f} |

- a / c = **{ratio_ac:.3f}** (target <= 1.15)
- b / a = **{ratio_ba:.2f}** (target >= 3)
- (a) and (b) score the same merges: largest difference in mean log-likelihood {max_difference:.2e}.

Machine:
{machine_markdown()}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
