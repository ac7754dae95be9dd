"""Peak memory of scoring one candidate with a large vocabulary: chunked token log-probabilities
(`evox_merge.tasks.logprobs`) against the full-logits path they replaced, side by side.

    python -m benchmarks.scoring_memory [--vocab 49152 128256] [--batch-size 64] [--out benchmarks/results/scoring_memory.md]

Each cell runs in a fresh process: a random Qwen2-shaped model (hidden 64, 2 layers, untied embeddings, so nearly
all its weights are the vocabulary: about 67 MB at 128k tokens) with two random LoRA experts, a character tokenizer
over the whole vocabulary, 64 language-modelling texts and 64 multiple-choice examples (4 choices) of random
characters (128 tokens per text); one candidate scored through `MergeProblem.evaluate`. It reports the process's RSS before
scoring (model, experts and the batched tasks loaded), the peak RSS while scoring (``ru_maxrss``), the seconds per
candidate, and what the full path's logits of one batch alone take (batch x tokens x vocabulary x 4 bytes).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT_TOKENS = 128
EXAMPLES = 64


def _cell(vocab: int, batch_size: int, mode: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import evox_merge.tasks.logprobs as logprobs_module
    from evox_merge.experts import ExpertSet
    from evox_merge.problems.merge_problem import MergeProblem
    from evox_merge.tasks import TaskSpec
    from evox_merge.zoo.char_tokenizer import build_char_tokenizer

    if mode == "full logits":
        logprobs_module._checked_head = lambda model, copies: None
    torch.manual_seed(0)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="scoring-memory-"))
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(root / "base")
    alphabet = "".join(chr(0xE000 + i) for i in range(vocab - 4))  # past the surrogates: every one a character
    # pad, bos, eos, unk and one token per character; in its own folder (beside a Qwen2 config, AutoTokenizer would
    # load it as Qwen2's byte-level tokenizer, which maps these characters to nothing)
    build_char_tokenizer(alphabet).save_pretrained(root / "tokenizer")
    for index in range(2):
        lora = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
        lora.save_pretrained(root / f"expert_{index}")
    del model, lora
    generator = torch.Generator().manual_seed(1)

    def words_of(count: int) -> str:
        return "".join(alphabet[int(i)] for i in torch.randint(0, len(alphabet), (count,), generator=generator))

    with open(root / "text.jsonl", "w") as handle:
        for _ in range(EXAMPLES):
            handle.write(json.dumps({"text": words_of(TEXT_TOKENS)}) + "\n")
    with open(root / "choice.jsonl", "w") as handle:
        for _ in range(EXAMPLES):
            handle.write(json.dumps({"prompt": words_of(TEXT_TOKENS - 8), "answer": 0,
                                     "choices": [words_of(8) for _ in range(4)]}) + "\n")
    experts = ExpertSet.load(root / "base", [root / "expert_0", root / "expert_1"], tokenizer=root / "tokenizer")
    tasks = [TaskSpec(name="text", type="language_modeling", path=str(root / "text.jsonl")),
             TaskSpec(name="choice", type="multiple_choice", path=str(root / "choice.jsonl"))]
    problem = MergeProblem(experts, tasks, batch_size=batch_size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    started = time.perf_counter()
    scores = problem.evaluate(torch.tensor([[0.5, 0.5]]))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    weights = sum(p.numel() * p.element_size() for p in experts.model.parameters()) / 1024 ** 3
    return {"vocab": vocab, "batch_size": batch_size, "mode": mode, "model_gib": weights, "rss_before_gib": before,
            "peak_gib": peak, "seconds": seconds, "fitness": float(scores[0]),
            "one_batch_logits_gib": batch_size * TEXT_TOKENS * vocab * 4 / 1024 ** 3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write a markdown table here")
    parser.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(_cell(int(args.cell[0]), int(args.cell[1]), args.cell[2])))
        return
    rows = []
    for vocab in args.vocab:
        for mode in ("chunked", "full logits"):
            done = subprocess.run([sys.executable, "-m", "benchmarks.scoring_memory", "--cell", str(vocab),
                                   str(args.batch_size), mode], capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    from evox_merge.util.machine import describe_machine

    lines = ["| vocabulary | path | model (GiB) | RSS before scoring | peak RSS | scoring's increase | one batch's "
             "full logits | s / candidate | fitness |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['vocab']:,} | {row['mode']} | {row['model_gib']:.3f} | {row['rss_before_gib']:.2f} | "
                     f"{row['peak_gib']:.2f} | {row['peak_gib'] - row['rss_before_gib']:.2f} | "
                     f"{row['one_batch_logits_gib']:.2f} | {row['seconds']:.1f} | {row['fitness']:.6f} |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        machine = describe_machine()
        args.out.write_text(
            f"# Scoring memory with a large vocabulary\n\n`python -m benchmarks.scoring_memory --batch-size "
            f"{args.batch_size} --out {args.out}` (module docstring: the model, tasks and what is measured).\n\n"
            f"{table}\n\nMachine: {machine['cpu']}, {machine.get('cores')} cores, torch {machine.get('torch')}; "
            "one torch thread per cell.\n")


if __name__ == "__main__":
    main()
