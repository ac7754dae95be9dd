"""Multiple-choice scoring: each prompt once + KV-cache continuation (ours) vs every prompt+choice sequence in full.

    python -m benchmarks.mc_scoring [--preset tiny] [--repeats 3] [--threads 1]

Both ways score the same zoo tasks with the base model, interleaved, in one process; the report gives seconds per
task, the ratio and whether the per-choice log-likelihoods agree (max absolute difference).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from evox_merge.tasks.batching import IGNORE, scored_sequences, target_batches
from evox_merge.experts import ExpertSet
from evox_merge.util.machine import machine_markdown
from evox_merge.tasks.scoring import MultipleChoiceScorer, pad_token_id
from evox_merge.tasks import read_task
from evox_merge.zoo import build_zoo, load_zoo


@torch.no_grad()
def full_sequence_logprobs(model, batches, num_rows: int) -> torch.Tensor:
    """Summed log-probability of every (example, choice) row, each row run through the model in full."""
    sums = torch.empty(num_rows, dtype=torch.float64)
    for batch in batches:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        scored = batch.targets != IGNORE
        picked = torch.zeros(scored.shape, dtype=torch.float32)
        picked[scored] = torch.log_softmax(logits[scored].float(), -1).gather(
            -1, batch.targets[scored].unsqueeze(-1)).squeeze(-1)
        sums[batch.rows] = picked.sum(-1).double()
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mc_scoring.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = load_zoo(build_zoo(preset=args.preset))
    experts = ExpertSet.load(zoo.base_dir, zoo.adapter_dirs)
    model, tokenizer = experts.model, experts.tokenizer
    lines = []
    for spec in [s for s in zoo.tasks if s.type == "multiple_choice"]:
        task = read_task(spec.with_split("test"))
        ours = MultipleChoiceScorer(task, tokenizer, args.batch_size, "cpu")
        sequences = scored_sequences(task, tokenizer)
        full = target_batches(sequences, pad_token_id(tokenizer), args.batch_size, "cpu")
        difference = (ours.choice_logprobs(model)[ours.real_choices] - full_sequence_logprobs(model, full, len(sequences))).abs()
        times: dict[str, list[float]] = {"cached": [], "full": []}
        for _ in range(args.repeats):
            for name, run in (("cached", lambda: ours.choice_logprobs(model)),
                              ("full", lambda: full_sequence_logprobs(model, full, len(sequences)))):
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
        cached, whole = statistics.median(times["cached"]), statistics.median(times["full"])
        lines.append(f"| {spec.name} | {len(task.records)} x {len(task.records[0]['choices'])} | {whole:.2f} | "
                     f"{cached:.2f} | {whole / cached:.2f} | {difference.max().item():.1e} |")
        print(lines[-1], flush=True)
    report = f"""# Multiple-choice scoring: cached prompt vs full sequences

Command: `python -m benchmarks.mc_scoring --preset {args.preset} --repeats {args.repeats} --threads {args.threads}`

Every multiple-choice task of the `{args.preset}` zoo (test split), scored with the base model both ways in one
process, repeats interleaved; median seconds. *Full*: every prompt + choice row through the model (what the
scorer did before). *Cached*: each prompt once, its KV cache repeated for the choices, the choices in one more
pass (`evox_merge.tasks.scoring.MultipleChoiceScorer`). The last column is the largest difference between the two
ways' per-choice log-likelihoods.

| task | examples x choices | full s | cached s | speed-up | max abs difference |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(lines)}

Machine:
{machine_markdown()}
"""
    args.out.write_text(report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
