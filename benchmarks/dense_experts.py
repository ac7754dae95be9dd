"""Dense (fully fine-tuned) experts whose task vectors exceed a memory limit: peak RSS and seconds per candidate
of the three ways to keep them (`evox_merge.experts.dense`: ``memory``, ``stream``, ``svd``), side by side.

The model has a real model's shape with random weights (no download): SmolLM2-135M's config (Llama, hidden 576,
30 layers, vocabulary 49,152, tied embeddings; 135M parameters, 0.54 GB in float32). Each of the N experts is the
base plus a synthetic fine-tune: per parameter a rank-16 change plus 10% full-rank noise (a decaying spectrum like
a real fine-tune's, so the SVD error at a moderate rank is neither 0 nor 1). N = 8 experts' task vectors are
4.0 GiB, above the stated memory limit of 2.5 GiB for the whole process (``--limit-gib``): ``memory`` mode cannot
stay within it and is run only to show what it costs.

Each mode runs in its own process (peak RSS is the process's VmHWM): load the expert set, then per candidate the
in-place merge alone, and the merge plus one forward pass over a batch of 8 x 128 tokens; ``svd`` also reports
the relative error of its merged weights against the exact merge on sampled parameters.

    python -m benchmarks.dense_experts [--experts 8] [--candidates 4] [--rank 64] [--limit-gib 2.5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from evox_merge.util.machine import machine_markdown

SHAPE = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
         "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
         "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
MODES = ("stream", "svd", "memory")


def _status_gib(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def build(root: Path, experts: int, seed: int) -> tuple[Path, list[Path]]:
    """The base and `experts` synthetic fine-tunes under `root` (reused when present)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    base_dir = root / "base"
    paths = [root / f"expert_{i}" for i in range(experts)]
    if all((p / "model.safetensors").is_file() for p in [base_dir, *paths]):
        return base_dir, paths
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in SHAPE.items() if k != "model_type"}))
    vocab = {f"t{i}": i for i in range(SHAPE["vocab_size"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", pad_token="t1", eos_token="t2")
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    for index, path in enumerate(paths):
        generator = torch.Generator().manual_seed(seed * 1000 + index)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                scale = 0.02 * float(base[name].float().std()) if base[name].numel() > 1 else 0.02
                if parameter.ndim == 2:
                    out, inp = parameter.shape
                    low = torch.randn(out, 16, generator=generator) @ torch.randn(16, inp, generator=generator) / 4
                    noise = 0.1 * torch.randn(out, inp, generator=generator)
                    delta = (low + noise) * scale
                else:
                    delta = torch.randn(parameter.shape, generator=generator) * scale
                parameter.copy_(base[name] + delta)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        print(f"wrote {path}", file=sys.stderr)
    return base_dir, paths


def child(mode: str, base_dir: Path, paths: list[Path], candidates: int, rank: int) -> dict:
    """One mode's measurements, in this process."""
    from evox_merge.experts import ExpertSet
    from evox_merge.experts.dense import TensorReader, safetensors_index
    from evox_merge.experts.merger import shared_merger

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    experts = ExpertSet.load(base_dir, paths, dense_mode=mode, dense_rank=rank if mode == "svd" else None)
    load_seconds = time.perf_counter() - started
    held = sum(t.stack.numel() * t.stack.element_size() for t in experts.dense.values() if t.stack is not None)
    held += sum(f.A_cat.numel() * 4 + f.B_scaled.numel() * 4 for f in experts.layers.values())
    rss_after_load = _status_gib("VmRSS")
    merger = shared_merger(experts)
    generator = torch.Generator().manual_seed(0)
    population = torch.rand(candidates, len(paths), generator=generator) * 0.6 - 0.1
    tokens = torch.randint(3, SHAPE["vocab_size"], (8, 128), generator=generator)
    merge_seconds, total_seconds = [], []
    errors = []
    reader = TensorReader()
    base_index = safetensors_index(base_dir)
    expert_index = [safetensors_index(p) for p in paths]
    sampled = ["model.layers.0.self_attn.q_proj.weight", "model.layers.15.mlp.down_proj.weight",
               "model.embed_tokens.weight", "model.layers.29.post_attention_layernorm.weight"]
    with torch.no_grad():
        for coefficients in population:
            started = time.perf_counter()
            merger.apply(coefficients)
            merged = time.perf_counter()
            experts.model(input_ids=tokens)
            total_seconds.append(time.perf_counter() - started)
            merge_seconds.append(merged - started)
            if mode == "svd":
                params = dict(experts.model.named_parameters())
                for name in sampled:
                    base = reader.read(base_index[name], name, params[name])
                    exact = base.clone()
                    for c, index in zip(coefficients.tolist(), expert_index):
                        exact.add_(reader.read(index[name], name, base) - base, alpha=c)
                    errors.append(float((params[name] - exact).norm() / (exact - base).norm()))
            merger.restore()
    svd_errors = [e.get("svd_max_relative_error") for e in experts.metadata]
    return {
        "mode": mode, "load_seconds": load_seconds, "held_gib": held / 2 ** 30, "rss_after_load_gib": rss_after_load,
        "peak_rss_gib": _status_gib("VmHWM"), "merge_seconds": merge_seconds, "candidate_seconds": total_seconds,
        "svd_max_relative_error": max(svd_errors) if mode == "svd" else None,
        "merged_relative_error": max(errors) if errors else None,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--limit-gib", type=float, default=2.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "evox-merge" / "bench-dense")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dense_experts.md"))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.work / f"smollm2-shape-{args.experts}x-seed{args.seed}"
    base_dir, paths = build(root, args.experts, args.seed)
    if args.child:
        print(json.dumps(child(args.child, base_dir, paths, args.candidates, args.rank)))
        return
    task_vector_gib = args.experts * sum((p.stat().st_size for p in [base_dir / "model.safetensors"])) / 2 ** 30
    results = []
    for mode in args.modes:
        command = [sys.executable, "-m", "benchmarks.dense_experts", "--child", mode, "--experts", str(args.experts),
                   "--candidates", str(args.candidates), "--rank", str(args.rank), "--seed", str(args.seed),
                   "--work", str(args.work)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise SystemExit(f"{mode}: {done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    write(args, results, task_vector_gib)


def write(args, results: list[dict], task_vector_gib: float) -> None:
    def mean(values):
        return sum(values) / len(values)

    lines = [
        "# Dense experts beyond a memory limit",
        "",
        f"Written by `python -m benchmarks.dense_experts --experts {args.experts} --candidates {args.candidates} "
        f"--rank {args.rank} --limit-gib {args.limit_gib:g}` (`benchmarks/dense_experts.py`; its docstring says how "
        "the model and experts are made).",
        "",
        f"SmolLM2-135M's shape with random weights (135M parameters, fp32); {args.experts} synthetic dense experts, "
        f"whose task vectors total **{task_vector_gib:.2f} GiB**, above the stated memory limit of "
        f"{args.limit_gib:g} GiB (peak RSS of the whole process). One process per mode, one thread; per candidate: "
        f"the in-place merge, then one forward pass of 8 x 128 tokens; mean of {args.candidates} candidates.",
        "",
        "| mode | task vectors held in RAM (GiB) | RSS after load (GiB) | peak RSS (GiB) | within the limit | load s "
        "| merge s / candidate | merge + forward s / candidate | SVD error (max over experts, parameters) "
        "| merged-weight error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        svd = f"{r['svd_max_relative_error']:.3f}" if r["svd_max_relative_error"] is not None else "exact"
        merged = f"{r['merged_relative_error']:.3f}" if r["merged_relative_error"] is not None else "exact"
        within = "yes" if r["peak_rss_gib"] <= args.limit_gib else "no"
        lines.append(f"| {r['mode']} | {r['held_gib']:.2f} | {r['rss_after_load_gib']:.2f} | {r['peak_rss_gib']:.2f} "
                     f"| {within} | {r['load_seconds']:.0f} | {mean(r['merge_seconds']):.2f} | {mean(r['candidate_seconds']):.2f} "
                     f"| {svd} | {merged} |")
    lines += [
        "",
        "Merged-weight error: relative Frobenius error of the merged delta against the exact merge, on four sampled "
        "parameters (a q_proj, a down_proj, the embedding, a norm), worst over the candidates. `stream` reads every "
        "expert's tensors from the files at each candidate (the OS page cache serves repeated reads; they are not "
        "in the process's RSS); `memory` and `stream` give bitwise-equal merges (tests/test_dense.py).",
        "",
        "## Machine",
        "",
        machine_markdown(),
        "",
        "Raw measurements:",
        "",
        "```json",
        json.dumps(results, indent=1),
        "```",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
