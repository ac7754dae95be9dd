"""The GPU benchmark (issue 30): a 1B- and an 8B-shaped model against the FLOP floor and mergekit-evolve's loop.

    python -m benchmarks.gpu [--budget-s 420] [--note "what else ran"]     # on a GPU: writes results/gpu.md
    python -m benchmarks.gpu --smoke [--out PATH]                          # the same code on the CPU, tiny shapes

For each shape, a Llama-style base with random weights (from a `LlamaConfig` built here, in the search's default
``dtype: auto``: bfloat16 on a GPU that has it), 8 real PEFT LoRA adapters of mixed ranks and targets (random
factors) and a zoo-sized task mix (multiple choice, generation, language modelling, each after a shared few-shot
prefix) are written to a temporary folder and loaded as a user would (`ExpertSet.load`, `MergeProblem`). Then:

- candidates per second, one candidate per pass (the in-place merge) and for each ``candidates_per_pass``;
- the FLOP floor of the same work: ``2 x (the body's matmul parameters x every token it must read + the output
  layer's x every position whose distribution a score needs)`` (attention's own FLOPs, about 1% at these lengths,
  left out), and how many times it our seconds are at the card's dense bf16 peak (`PEAK_BF16`);
- peak GPU memory (``torch.cuda.max_memory_allocated``) per row;
- mergekit-evolve's loop on the same GPU and work: merge the candidate into the full model, ``save_pretrained``,
  load it back, score it (with our already tokenised scorers, which only flatters the loop), as a ratio.

Every row is written to the results file as it finishes (a run cut short still leaves its rows, and its status line
says so); ``--budget-s`` skips what would not fit (the 8B shape first). ``--smoke`` never writes gpu.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "gpu.md"
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION, MLP = MODULES[:4], MODULES[4:]
EXPERTS = [(8, ATTENTION), (16, MLP), (32, ["q_proj", "v_proj"]), (64, MODULES), (8, MODULES),
           (16, ATTENTION + ["up_proj"]), (32, MLP), (64, ["q_proj", "v_proj", "down_proj"])]
LLAMA = {"num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192}
SHAPES = {  # Llama 3.2 1B and Llama 3.1 8B
    "1B": dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True),
    "8B": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False),
}
SMOKE = {"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024}
SMOKE_SHAPES = {"1B": dict(SMOKE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=True),
                "8B": dict(SMOKE, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                           tie_word_embeddings=False)}
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12), ("L4", 121e12)]
"""Dense (no sparsity) bf16 tensor-core peaks in FLOP/s by card name, first match wins (NVIDIA's data sheets; the
H100 without PCIe/NVL in its name is the SXM part)."""


def peak_flops(name: str) -> tuple[float | None, str]:
    """The card's dense bf16 peak and the table entry it came from (None where the table has none)."""
    for key, peak in PEAK_BF16:
        if key in name:
            return peak, f"{peak / 1e12:.0f} TFLOP/s dense bf16 (table entry '{key}')"
    return None, "no dense bf16 peak in the table for this device: no ratio to the floor"


def char_tokenizer(vocabulary: int):
    """A character tokenizer filling the model's whole vocabulary (the text uses its first ~90 characters; the
    output layer and every logsumexp still run over all `vocabulary` entries)."""
    from evox_merge.zoo.char_tokenizer import DEFAULT_ALPHABET, build_char_tokenizer

    filler = "".join(chr(0x10000 + index) for index in range(vocabulary - 4 - len(DEFAULT_ALPHABET)))
    return build_char_tokenizer(DEFAULT_ALPHABET + filler)


def build_model(root: Path, shape: dict, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Write a random Llama base (built on `device`) and the 8 LoRA experts under `root`; returns sizes and timings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    started = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype)
    tokenizer = char_tokenizer(shape["vocab_size"])
    built = time.perf_counter()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    saved = time.perf_counter()
    for index, (rank, targets) in enumerate(EXPERTS):
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets),
                                    autocast_adapter_dtype=False)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:  # A ~ N(0, 1/in), B small: merges stay near the base's scale
                    parameter.normal_(0, (0.01 if "lora_B" in name else 1.0) / parameter.shape[1] ** 0.5)
        peft_model.peft_config["default"].base_model_name_or_path = str(root / "base")
        peft_model.save_pretrained(root / f"expert_{index}")
        model = peft_model.unload()
    linear = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n
                 and "lm_head" not in n)
    head = shape["vocab_size"] * shape["hidden_size"]
    total = sum(p.numel() for p in model.parameters())
    del model, peft_model
    release(device)
    return {"parameters": total, "body_matmul_parameters": linear, "head_parameters": head,
            "build_s": built - started, "save_base_s": saved - built, "adapters_s": time.perf_counter() - saved}


def write_tasks(root: Path, examples: int, new_tokens: int, seed: int) -> list:
    """Zoo-sized tasks over random words, each after a 5-shot prefix: multiple choice (4 choices), generation
    (stop at a newline) and language modelling."""
    from evox_merge.tasks import TaskSpec

    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(5, 10)))

    def rows(kind: str, count: int) -> list[dict]:
        out = []
        for _ in range(count):
            w = word()
            out.append({"choice": {"prompt": f"reverse {w}:", "choices": [w[::-1], w, w.upper(), w[1:] + w[0]],
                                   "answer": 0},
                        "copy": {"prompt": f"copy {w} =", "answer": f" {w}"},
                        "text": {"text": f"the word {w} read backwards is {w[::-1]}."}}[kind])
        return out

    specs = []
    for kind, task_type in (("choice", "multiple_choice"), ("copy", "generation"), ("text", "language_modeling")):
        demos = rows(kind, 5)
        prefix = "".join((d["prompt"] + " " + d["choices"][0] if kind == "choice" else
                          d["prompt"] + d["answer"] if kind == "copy" else d["text"]) + "\n" for d in demos)
        path = root / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows(kind, examples)))
        extra = {"max_new_tokens": new_tokens, "stop": ["\n"]} if kind == "copy" else {}
        specs.append(TaskSpec(name=kind, type=task_type, path=str(path), prefix=prefix, **extra))
    return specs


def floor_work(tasks, tokenizer) -> dict:
    """Tokens the merged model must read (``body``) and positions whose next-token distribution a score needs
    (``head``) per candidate: the shared prefix once per task, each example's own tokens, each choice, and for
    generation ``max_new_tokens`` per example (random weights never stop early; decoding feeds back all but the
    last)."""
    from evox_merge.tasks.batching import encode, scored_sequences
    from evox_merge.tasks.prefix import common_prefix_length

    body = head = 0
    for task in tasks:
        if task.spec.type == "generation":
            prompts = [encode(tokenizer, r["prompt"], special=True) for r in task.records]
            shared = common_prefix_length(prompts)
            steps = task.spec.max_new_tokens
            body += shared + sum(len(p) - shared for p in prompts) + len(prompts) * (steps - 1)
            head += len(prompts) * steps
            continue
        rows = scored_sequences(task, tokenizer)
        contexts = [ids[:context] for ids, context in rows]
        shared = common_prefix_length(contexts, keep=0)
        scored = sum(len(ids) - context for ids, context in rows)
        if task.spec.type == "multiple_choice":  # one prompt per example, then its choices
            starts = [0] + list(torch.tensor([len(r["choices"]) for r in task.records]).cumsum(0)[:-1].tolist())
            body += shared + sum(len(contexts[s]) - shared for s in starts) + scored
        else:
            body += shared + sum(len(ids) - shared for ids, _ in rows)
        head += scored
    return {"body_tokens": body, "head_tokens": head}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


class Report:
    """The results file, rewritten whole (atomically) after every row, so a run cut short keeps its rows."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.meta = path, meta
        self.started = time.perf_counter()
        self.rows: list[dict] = []
        self.loops: list[dict] = []
        self.shapes: dict[str, dict] = {}
        self.skipped: list[str] = []
        self.status = ("partial: running, or stopped before the end (timed out or failed) after the rows below; "
                       f"started {time.strftime('%Y-%m-%d %H:%M:%S')}")

    def write(self, line: str | None = None) -> None:
        """Rewrite the file; print `line` (what just finished) with the seconds since the start."""
        from benchmarks.gpu_report import render
        from evox_merge.util.atomic import write_text_atomic

        write_text_atomic(self.path, render(self))
        if line is not None:
            print(f"[{time.perf_counter() - self.started:6.1f} s] {line}", flush=True)


def run_shape(label: str, shape: dict, args, report: Report, deadline: float) -> None:
    """Build, load and measure one shape (rows of `report`, written as they finish)."""
    from evox_merge.experts import ExpertSet
    from evox_merge.run.config import resolve_dtype
    from evox_merge.tasks import read_task

    device = torch.device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else resolve_dtype("auto", args.device)
    dtype = getattr(torch, dtype_name)
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        root = Path(folder)
        facts = build_model(root, shape, device, dtype, args.seed)
        specs = write_tasks(root, args.examples, args.new_tokens, args.seed)
        started = time.perf_counter()
        experts = ExpertSet.load(root / "base", [root / f"expert_{i}" for i in range(len(EXPERTS))], device=device,
                                 dtype=dtype, task_specs=specs)
        facts.update(load_s=time.perf_counter() - started, dtype=experts.dtype_name,
                     **floor_work([read_task(spec) for spec in specs], experts.tokenizer))
        facts["floor_flop"] = 2 * (facts["body_matmul_parameters"] * facts["body_tokens"]
                                   + facts["head_parameters"] * facts["head_tokens"])
        report.shapes[label] = facts
        report.write(f"{label}: built and loaded ({facts['parameters'] / 1e9:.2f} B parameters, {experts.dtype_name})")
        generator = torch.Generator().manual_seed(args.seed)
        population = 2 * torch.rand(max([args.population, *args.per_pass]), experts.num_experts,
                                    generator=generator) - 1  # the default search box [-1, 1]
        reference, last_seconds = None, 0.0
        for order, per_pass in enumerate(args.per_pass):
            if order and time.perf_counter() + 1.5 * last_seconds > deadline:
                report.skipped.append(f"{label} P={per_pass}: the last row took {last_seconds:.0f} s, "
                                      f"{max(0.0, deadline - time.perf_counter()):.0f} s of the budget left")
                continue
            began = time.perf_counter()
            row = measure(experts, specs, population, per_pass, args, device)
            last_seconds = time.perf_counter() - began
            scores = row.pop("scores", None)
            reference = scores if reference is None else reference
            if scores is not None:  # the same candidates, scored one per pass and several per pass
                common = min(len(scores), len(reference))
                row["max_abs_diff_vs_first_row"] = float((scores[:common] - reference[:common]).abs().max())
            report.rows.append({"shape": label, **row})
            report.write(f"{label} P={per_pass}: {row.get('candidates_per_s', 0):.3f} candidates/s "
                         f"{row.get('error', '')}")
            if order == min(1, len(args.per_pass) - 1):  # after P=1 (and the first P > 1): mergekit's loop
                loop_rows(label, experts, specs, population, reference, args, device, report, deadline, facts)
        del experts
        release(device)


def measure(experts, specs, population, per_pass: int, args, device) -> dict:
    """Candidates per second of `MergeProblem` at `per_pass` candidates per pass, after a warm-up."""
    from evox_merge.problems.merge_problem import MergeProblem

    count = max(args.population, per_pass)
    try:
        problem = MergeProblem(experts, specs, batch_size=args.batch_size, candidates_per_pass=per_pass)
        problem.evaluate_per_task(population[:per_pass])  # warm-up: kernels chosen, the head checked
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        scores = problem.evaluate_per_task(population[:count])
        synchronize(device)
        seconds = time.perf_counter() - started
    except torch.OutOfMemoryError as error:
        release(device)
        return {"per_pass": per_pass, "candidates": 0, "error": f"out of memory: {str(error).splitlines()[0]}"}
    finally:
        release(device)
    return {"per_pass": per_pass, "candidates": count, "seconds": seconds, "candidates_per_s": count / seconds,
            "peak_gib": peak_gib(device), "scores": scores, "finite": bool(torch.isfinite(scores).all())}


def loop_rows(label: str, experts, specs, population, reference, args, device, report: Report, deadline: float,
              facts: dict) -> None:
    """mergekit-evolve's per-candidate loop: merge into the full model, save it, load it back, score it."""
    from transformers import AutoModelForCausalLM

    from evox_merge.experts.merger import shared_merger
    from evox_merge.problems.merge_problem import MergeProblem

    problem = MergeProblem(experts, specs, batch_size=args.batch_size)  # its scorers, tokenised once
    merger = shared_merger(experts)
    estimate = facts["save_base_s"] + facts["load_s"]
    for index in range(args.loop_candidates):
        if time.perf_counter() + 1.2 * estimate > deadline:
            report.skipped.append(f"{label} mergekit loop candidate {index}: ~{estimate:.0f} s each, "
                                  f"{max(0.0, deadline - time.perf_counter()):.0f} s of the budget left")
            break
        folder = Path(tempfile.mkdtemp(dir=args.tmp))
        try:
            began = time.perf_counter()
            merger.apply(population[index])
            synchronize(device)
            merged = time.perf_counter()
            experts.model.save_pretrained(folder)
            saved = time.perf_counter()
            merger.restore()
            try:
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=experts.model.dtype, device_map=str(device))
            except (ImportError, ValueError):  # no accelerate: load, then move
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=experts.model.dtype).to(device)
            model.eval().requires_grad_(False)  # as `ExpertSet.load` prepares its model
            synchronize(device)
            loaded = time.perf_counter()
            scores = torch.tensor([scorer.score(model) for scorer in problem.scorers], dtype=torch.float64)
            synchronize(device)
            done = time.perf_counter()
        finally:
            merger.restore()
            model = None
            shutil.rmtree(folder, ignore_errors=True)
            release(device)
        estimate = done - began
        report.loops.append({"shape": label, "candidate": index, "seconds": done - began, "merge_s": merged - began,
                             "save_s": saved - merged, "load_s": loaded - saved, "score_s": done - loaded,
                             "max_abs_diff_vs_in_place": None if reference is None else
                             float((scores - reference[index]).abs().max())})
        report.write(f"{label} mergekit loop candidate {index}: {done - began:.2f} s")


def other_gpu_processes() -> str:
    """What else holds the GPU (nvidia-smi's compute processes), or why that is unknown."""
    try:
        query = ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({type(error).__name__})"
    mine = str(os.getpid())
    others = [line for line in out.stdout.splitlines() if line.strip() and not line.startswith(mine + ",")]
    return "; ".join(others) if others else "none (nvidia-smi lists no other compute process)"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU with tiny shapes (< 60 s)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: results/gpu.md; --smoke: "
                                                               "a temporary file)")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 420; smoke 50)")
    parser.add_argument("--min-8b-s", type=float, default=None,
                        help="start the 8B shape only with this much budget left (default 240; smoke 2)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--per-pass", type=int, nargs="+", default=None, help="default 1 8 4 16; smoke 1 2 4")
    parser.add_argument("--population", type=int, default=None, help="candidates per timed row (default 8; smoke 4)")
    parser.add_argument("--examples", type=int, default=None, help="examples per task (default 64; smoke 6)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generation max_new_tokens (default 16; smoke 4)")
    parser.add_argument("--loop-candidates", type=int, default=None, help="mergekit-loop candidates (default 2; "
                                                                          "smoke 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default=None, help="default auto (bfloat16 on a GPU); smoke bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", default=None, help="folder for the model files (default: the system's temp)")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = {"budget_s": (420.0, 50.0), "min_8b_s": (240.0, 2.0), "per_pass": ([1, 8, 4, 16], [1, 2, 4]),
                "population": (8, 4), "examples": (64, 6), "new_tokens": (16, 4), "loop_candidates": (2, 1),
                "dtype": ("auto", "bfloat16")}
    for key, (gpu, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, cpu if smoke else gpu)
    args.device = "cpu" if smoke else "cuda"
    if smoke:
        torch.set_num_threads(1)  # tiny shapes: one thread is fastest, and leaves a shared machine's cores alone
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "evox_merge_gpu_smoke.md" if smoke else RESULTS
    if smoke and args.out.resolve() == RESULTS.resolve():
        parser.error(f"--smoke never writes {RESULTS}: its GPU numbers stay; give another --out")
    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --smoke for the CPU check")
    return args


def main(argv: list[str] | None = None) -> Report:
    """Run the benchmark; returns the report (also written to ``args.out``)."""
    from evox_merge.util.machine import describe_machine

    started = time.perf_counter()
    args = parse(argv)
    deadline = started + args.budget_s
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (smoke run: tiny shapes, no GPU)"
    peak, peak_source = peak_flops(card) if args.device == "cuda" else (None, "no peak: CPU smoke run")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    meta = {"command": " ".join(["python -m benchmarks.gpu", *(argv if argv is not None else sys.argv[1:])]),
            "card": card, "peak_flops": peak, "peak_source": peak_source, "smoke": args.smoke,
            "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
                         if key not in ("note",)},
            "shapes": {label: shapes[label] for label in args.shapes}, "experts": EXPERTS,
            "load_at_start": os.getloadavg(), "other_gpu_processes": other_gpu_processes() if not args.smoke
            else "n/a (CPU)", "note": args.note, "machine": describe_machine()}
    report = Report(args.out, meta)
    report.started = started
    report.write(f"started on {card}; writing {args.out}")
    for label in args.shapes:
        left = deadline - time.perf_counter()
        if label != args.shapes[0] and left < args.min_8b_s:
            report.skipped.append(f"{label} shape: {max(0.0, left):.0f} s of the {args.budget_s:.0f} s budget left, "
                                  f"it needs about {args.min_8b_s:.0f} s (--min-8b-s)")
            continue
        run_shape(label, shapes[label], args, report, deadline)
    meta["load_at_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - started
    report.status = "complete" + (f", with {len(report.skipped)} part(s) skipped for time (listed below)"
                                  if report.skipped else "")
    report.write()
    print(f"wrote {args.out} ({report.status})", flush=True)
    return report


if __name__ == "__main__":
    main()
