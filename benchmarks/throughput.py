"""Seconds per candidate: MergeProblem.evaluate vs a PEFT weighted-adapter loop vs the base-model floor.

Measured side by side in one run on the same model, experts, task and population:
  (a) MergeProblem.evaluate(pop): in-place merge + batched scoring;
  (b) the loop a user would write with PEFT: per candidate add_weighted_adapter (cat, and PEFT's default svd),
      set_adapter, score, delete_adapter (all adapters loaded once, before timing);
  (c) the floor: the unmerged base model scoring the same data P times.

    python -m benchmarks.throughput [--population 8] [--repeats 3] [--out benchmarks/results/throughput.md]
    python -m benchmarks.throughput --preset smollm2 --population 4 --repeats 2 --threads 1   # a zoo's real model

Without --preset: a random Qwen2 base and random LoRA experts, on random-letter tasks. With --preset: the zoo's base
and experts (its cached build) on its own validation files, the first task of each kind in --tasks. Each setup is one
section of the report; a rerun replaces its own section and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from evox_merge.util.machine import machine_markdown
from evox_merge.util.report_text import replace_section
from evox_merge.zoo.char_tokenizer import DEFAULT_ALPHABET, build_char_tokenizer
from evox_merge.experts import ExpertSet
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.tasks.scorers import build_scorer
from evox_merge.tasks import TaskSpec, read_task

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def build_setup(root: Path, experts: int, rank: int, hidden: int, layers: int, seed: int):
    """A random Qwen2 base of a few million parameters and `experts` random rank-`rank` LoRA adapters."""
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
    return root / "base", adapter_dirs, sum(p.numel() for p in model.parameters())


def write_task(root: Path, kind: str, examples: int, length: int, seed: int) -> TaskSpec:
    """A validation task of random letters: `lm` texts of `length` characters, `mc` prompts of `length` with
    4 choices of 8, or `gen` prompts of `length` decoding 8 tokens."""
    rng = random.Random(seed)
    letters = DEFAULT_ALPHABET[:62]

    def word(n: int) -> str:
        return "".join(rng.choice(letters) for _ in range(n))

    path = root / f"{kind}.jsonl"
    if kind == "lm":
        rows = [{"text": word(length - 1)} for _ in range(examples)]
        spec = TaskSpec(name=kind, type="language_modeling", path=str(path))
    elif kind == "mc":
        rows = [{"prompt": word(length), "choices": [word(8) for _ in range(4)], "answer": 0} for _ in range(examples)]
        spec = TaskSpec(name=kind, type="multiple_choice", path=str(path))
    else:
        rows = [{"prompt": word(length), "answer": word(8)} for _ in range(examples)]
        spec = TaskSpec(name=kind, type="generation", path=str(path), max_new_tokens=8, stop=())
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return spec


def time_calls(function, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return seconds


def peft_loop(peft_model, scorer, names: list[str], pop: torch.Tensor, combination: str) -> list[float]:
    """What a user writes with PEFT: a weighted adapter per candidate, scored, then deleted."""
    scores = []
    for coefficients in pop.tolist():
        peft_model.add_weighted_adapter(names, coefficients, "candidate", combination_type=combination)
        peft_model.set_adapter("candidate")
        scores.append(scorer.score(peft_model))
        peft_model.delete_adapter("candidate")
    return scores


def padded_tokens(batch) -> int:
    """Token positions a batch runs through the model (padding included)."""
    if hasattr(batch, "choice_ids"):
        return batch.prompt_ids.numel() + batch.choice_ids.numel()
    return batch.input_ids.numel()


KINDS = {"lm": "language_modeling", "mc": "multiple_choice", "gen": "generation"}


def zoo_setup(preset: str, kinds: list[str]) -> tuple[Path, list[Path], int, dict[str, TaskSpec], str]:
    """A zoo's base and experts (built into its cache if missing), its parameter count, the first validation task of
    each kind in `kinds`, and a description of the setup."""
    from evox_merge.zoo import build_zoo, load_zoo

    zoo = load_zoo(build_zoo(None, preset=preset, seed=0))
    specs = {}
    for kind in kinds:
        spec = next((t for t in zoo.tasks if t.type == KINDS[kind]), None)
        if spec is not None:
            specs[kind] = TaskSpec(**{**spec.to_dict(), "test_path": None})
    shapes = [json.loads((Path(d) / "adapter_config.json").read_text()) for d in zoo.adapter_dirs]
    experts = ", ".join(f"{Path(d).name} r{c['r']} on {'/'.join(sorted(c['target_modules']))}"
                        for d, c in zip(zoo.adapter_dirs, shapes))
    model = AutoModelForCausalLM.from_pretrained(zoo.base_dir)
    parameters = sum(p.numel() for p in model.parameters())
    description = (f"the `{preset}` zoo (`evox-merge zoo build --preset {preset}`): base {model.config.model_type}, "
                   f"hidden {model.config.hidden_size}, {model.config.num_hidden_layers} layers, "
                   f"{parameters / 1e6:.2f} M parameters; {len(zoo.adapter_dirs)} LoRA experts ({experts}); "
                   "its own validation files, one task per row: "
                   + ", ".join(f"{kind} = `{spec.name}`" for kind, spec in specs.items()))
    return Path(zoo.base_dir), [Path(d) for d in zoo.adapter_dirs], parameters, specs, description


def measure(kind: str, spec: TaskSpec, args, base_dir: Path, adapter_dirs: list[Path]) -> dict:
    """Seconds per candidate of (a), (b) cat, (b) svd and (c) on one task; interleaved repeats."""
    experts = ExpertSet.load(base_dir, adapter_dirs)
    problem = MergeProblem(experts, [spec], batch_size=args.batch_size)
    pop = torch.rand(args.population, len(adapter_dirs), generator=torch.Generator().manual_seed(0)) * 0.5
    task = read_task(spec)
    scorer = build_scorer(task, experts.tokenizer, args.batch_size, "cpu")
    rows = sum(padded_tokens(batch) for batch in scorer.batches)
    base_model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), adapter_dirs[0], adapter_name="e0"
    ).eval()
    for index, path in enumerate(adapter_dirs[1:], start=1):
        peft_model.load_adapter(path, adapter_name=f"e{index}")
    names = [f"e{i}" for i in range(len(adapter_dirs))]

    ours = problem.evaluate_per_task(pop)[:, 0].tolist()
    theirs = peft_loop(peft_model, scorer, names, pop, "cat")
    methods = {
        "a": lambda: problem.evaluate(pop),
        "b_cat": lambda: peft_loop(peft_model, scorer, names, pop, "cat"),
        "b_svd": lambda: peft_loop(peft_model, scorer, names, pop, "svd"),
        "c": lambda: [scorer.score(base_model) for _ in range(args.population)],
    }
    methods["b_svd"]()  # warm-up of the two methods not run above
    methods["c"]()
    timings = {name: [] for name in methods}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every method alike
        for name, function in methods.items():
            timings[name] += time_calls(function, 1)
    per_candidate = {name: statistics.median(values) / args.population for name, values in timings.items()}
    return {"kind": kind, "examples": len(task.records), "tokens": rows, "max_difference": max(abs(a - b) for a, b in zip(ours, theirs)),
            **per_candidate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="a zoo preset (e.g. smollm2): measure on its base, experts and tasks")
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8, help="random setup only")
    parser.add_argument("--rank", type=int, default=8, help="random setup only")
    parser.add_argument("--hidden", type=int, default=256, help="random setup only")
    parser.add_argument("--layers", type=int, default=4, help="random setup only")
    parser.add_argument("--examples", type=int, default=64, help="random setup only")
    parser.add_argument("--length", type=int, default=64, help="random setup only")
    parser.add_argument("--tasks", nargs="+", default=["lm", "mc", "gen"], choices=list(KINDS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.preset:
            base_dir, adapter_dirs, parameters, specs, setup = zoo_setup(args.preset, args.tasks)
        else:
            base_dir, adapter_dirs, parameters = build_setup(
                root, args.experts, args.rank, args.hidden, args.layers, seed=0
            )
            specs = {kind: write_task(root, kind, args.examples, args.length, seed=1) for kind in args.tasks}
            setup = (f"random Qwen2 base, hidden {args.hidden}, {args.layers} layers, {parameters / 1e6:.2f} M "
                     f"parameters; {args.experts} LoRA experts of rank {args.rank} on {', '.join(TARGETS)}; random "
                     f"letters, {args.examples} examples per task (prompt/text length {args.length})")
        results = [measure(kind, spec, args, base_dir, adapter_dirs) for kind, spec in specs.items()]

    lines = []
    for r in results:
        lines.append(
            f"| {r['kind']} | {r['examples']} | {r['tokens']} | {r['a']:.4f} | {r['b_cat']:.4f} | {r['b_svd']:.4f} "
            f"| {r['c']:.4f} | **{r['a'] / r['c']:.3f}** | **{r['b_cat'] / r['a']:.2f}** | {r['b_svd'] / r['a']:.2f} "
            f"| {r['max_difference']:.1e} |"
        )
    command = "python -m benchmarks.throughput" + (f" --preset {args.preset}" if args.preset else "") + (
        f" --population {args.population} --repeats {args.repeats} --threads {args.threads}")
    section = f"""## {f"The `{args.preset}` zoo" if args.preset else "A random Qwen2 model"}

Command: `{command}`

Setup: {setup}. `tokens` = padded tokens per forward sweep, batch size {args.batch_size}; population
P = {args.population}; median of {args.repeats} interleaved repeats, all methods measured in the same process on the
same model, experts, task and population.

- (a) `MergeProblem.evaluate`: in-place merge, then batched scoring;
- (b) the PEFT loop a user would write: per candidate `add_weighted_adapter` (combination `cat`, exact, or PEFT's
  default `svd`), `set_adapter`, score with the same scorer, `delete_adapter` (adapters loaded once, untimed);
- (c) the floor: the unmerged base model scoring the same data P times.

| task | examples | tokens | (a) s/cand | (b) cat s/cand | (b) svd s/cand | (c) s/cand | a/c (target <= 1.15) | b_cat/a (target >= 3) | b_svd/a | max abs score diff a vs b_cat |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(lines)}

Machine (measured {time.strftime("%Y-%m-%d")}):
{machine_markdown()}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(replace_section(args.out, f"zoo-{args.preset}" if args.preset else "random", section,
                                        "# Throughput: seconds per candidate evaluation\n"))
    print(section)


if __name__ == "__main__":
    main()
