"""Below the floor: shared few-shot prefixes run once per candidate, the greedy decoding loop, and (on a GPU)
several candidates per forward pass.

    python -m benchmarks.below_floor [--preset tiny] [--shots 5] [--repeats 5] [--threads 1]
    python -m benchmarks.below_floor --gpu-candidates --device cuda      # part 4, needs a GPU to mean anything

1. *Shared prefix*: k-shot versions of zoo tasks (k demonstrations drawn from the validation file, as the task
   spec's ``prefix``, before every other validation example; a generation task is also scored as language
   modelling of prompt + answer after the same demonstrations). Each candidate (a random merge, written in place)
   is scored by the plain path (``min_shared_prefix=None``) and the shared-prefix path, interleaved in one process;
   median seconds per candidate, the ratio, and the largest difference between the two paths' per-example
   log-likelihoods (multiple choice, language modelling) or the number of differing completions (generation).
2. *Decoding loop*: the zoo's 0-shot generation task scored by the decoding loop of commit BASELINE (loaded from
   git into this process) and by today's, interleaved; torch.profiler tables of both.
3. *Candidates per pass* (``--gpu-candidates``): MergeProblem one candidate at a time (in-place merge) against
   ``candidates_per_pass`` P = 4, 8, 16 on a small and a ~1B-parameter random-weight Qwen2 built from a config
   (no download): candidates per second, peak GPU memory, the largest score difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from evox_merge.experts import ExpertSet
from evox_merge.experts.merger import shared_merger
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.tasks import Task, TaskSpec, read_task
from evox_merge.tasks.scorers import build_scorer
from evox_merge.tasks.scoring import GenerationScorer
from evox_merge.util.machine import machine_markdown
from evox_merge.zoo import build_zoo, load_zoo

BASELINE = "35fd3d2"  # the commit before this benchmark's changes: its decoding loop is the "before"
TASKS = ("reverse", "digit_sum", "choose_next_skip")  # a generation and two multiple-choice zoo tasks


def fewshot_tasks(zoo, names, shots: int, seed: int, root: Path) -> list[Task]:
    """k-shot versions of the named zoo tasks (validation files), plus language modelling of the first
    generation task's prompt + answer after the same demonstrations."""
    tasks = []
    for spec in [s for s in zoo.tasks if s.name in names]:
        records = [json.loads(line) for line in Path(spec.path).read_text().splitlines() if line.strip()]
        rng = random.Random(f"{seed}-{spec.name}")
        picked = set(rng.sample(range(len(records)), shots))
        demos = [records[i] for i in sorted(picked)]
        rest = [r for i, r in enumerate(records) if i not in picked]
        answer = (lambda r: r["answer"]) if spec.type == "generation" else (lambda r: r["choices"][r["answer"]])
        prefix = "".join(r["prompt"] + answer(r) + "\n" for r in demos)
        path = root / f"{spec.name}_{shots}shot.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rest))
        fields = {**spec.__dict__, "name": f"{spec.name}_{shots}shot", "path": str(path), "test_path": None}
        tasks.append(read_task(TaskSpec(**{**fields, "prefix": prefix})))
        if spec.type == "generation" and not any(t.spec.type == "language_modeling" for t in tasks):
            lm_path = root / f"{spec.name}_lm_{shots}shot.jsonl"
            lm_path.write_text("".join(json.dumps({"text": r["prompt"] + r["answer"]}) + "\n" for r in rest))
            tasks.append(read_task(TaskSpec(name=f"{spec.name}_lm_{shots}shot", type="language_modeling",
                                            path=str(lm_path), prefix=prefix)))
    return tasks


def per_example(scorer, model):
    """What must not change: per-example log-likelihoods (MC, LM) or completions (generation)."""
    if isinstance(scorer, GenerationScorer):
        return scorer.completions(model)
    if scorer.task.spec.type == "multiple_choice":
        return scorer.choice_logprobs(model)[scorer.real_choices]
    sums, _ = scorer.row_logprobs(model)
    return sums[0]


def difference(a, b) -> str:
    if isinstance(a, list):
        return (f"{sum(x != y for x, y in zip(a, b))} of {len(a)} completions differ ({len(set(a))} distinct, "
                f"{sum(len(x) for x in a) / len(a):.1f} characters on average)")
    return f"max abs log-lik. diff {(a - b).abs().max().item():.1e}"


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def profile_table(function, rows: int = 12) -> tuple[str, float, float]:
    """torch.profiler's self-CPU table of one call, the call's wall seconds and the ops' total self CPU seconds."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        function()
        wall = time.perf_counter() - started
    averages = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in averages) / 1e6
    return averages.table(sort_by="self_cpu_time_total", row_limit=rows), wall, total


@contextmanager
def forward_timer(model, total: list[float]):
    """Adds the seconds spent inside the model's forward calls to ``total[0]`` while active."""
    started = []
    handles = [model.register_forward_pre_hook(lambda *_: started.append(time.perf_counter())),
               model.register_forward_hook(lambda *_: total.__setitem__(0, total[0] + time.perf_counter()
                                                                         - started.pop()))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def legacy_greedy():
    """`greedy_completions` as of commit BASELINE, executed from git (one list of strings or None per batch)."""
    source = subprocess.run(["git", "show", f"{BASELINE}:evox_merge/tasks/generation.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("baseline_generation")
    exec(compile(source, f"{BASELINE}:evox_merge/tasks/generation.py", "exec"), module.__dict__)
    return module.greedy_completions


def shared_prefix_rows(args, experts, root: Path) -> list[str]:
    zoo = load_zoo(build_zoo(preset=args.preset))
    model, tokenizer = experts.model, experts.tokenizer
    merger = shared_merger(experts)
    generator = torch.Generator().manual_seed(args.seed)
    candidates = torch.randn(args.repeats, experts.num_experts, generator=generator) * 0.5
    lines, tables = [], []
    tasks = [task for shots in args.shots for task in fewshot_tasks(zoo, args.tasks, shots, args.seed, root)]
    for task in tasks:
        plain = build_scorer(task, tokenizer, args.batch_size, "cpu", min_shared_prefix=None)
        shared = build_scorer(task, tokenizer, args.batch_size, "cpu")  # the default minimum
        assert shared.prefix is not None, task.name
        base_name = task.name.split("_lm_")[0].rsplit("_", 1)[0]
        check_with = candidates[0]
        if base_name in experts.expert_names:  # the task's own expert: real answers, a stronger agreement check
            check_with = torch.nn.functional.one_hot(torch.tensor(experts.expert_names.index(base_name)),
                                                     experts.num_experts).float()
        with merger.merged(check_with):
            check = difference(per_example(plain, model), per_example(shared, model))
            score_plain, score_shared = plain.score(model), shared.score(model)
        times = {"plain": [], "shared": []}
        for coefficients in candidates:  # one candidate per repeat, both paths interleaved under the same merge
            with merger.merged(coefficients):
                for name, scorer in (("plain", plain), ("shared", shared)):
                    times[name].append(timed(lambda: scorer.score(model)))
        a, b = statistics.median(times["plain"]), statistics.median(times["shared"])
        context = [task.spec.prefix + r["text"] if "text" in r else r["prompt"] for r in task.records]
        tokens = statistics.mean(len(tokenizer(text)["input_ids"]) for text in context)
        choices = [sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in r["choices"])
                   for r in task.records if "choices" in r]
        tokens = f"{tokens:.0f}" + (f" + {statistics.mean(choices):.0f} in choices" if choices else "")
        lines.append(f"| {task.name} | {task.spec.type} | {len(task.records)} | {shared.prefix.length} | "
                     f"{tokens} | {a:.3f} | {b:.3f} | {a / b:.2f} | "
                     f"{check}; score {score_plain:.4f} vs {score_shared:.4f} |")
        print(lines[-1], flush=True)
        if task.spec.type == "multiple_choice" and not tables and task.name.endswith(f"_{max(args.shots)}shot"):
            with merger.merged(candidates[0]):
                for name, scorer in (("plain", plain), ("shared", shared)):
                    table, wall, ops = profile_table(lambda: scorer.score(model), rows=8)
                    tables.append(f"**{task.name}, {name}**: wall {wall:.3f} s, ops' self CPU total {ops:.3f} s"
                                  f"\n\n```\n{table}```\n")
    return lines, tables


def decoding_rows(args, experts) -> tuple[list[str], list[str]]:
    zoo = load_zoo(build_zoo(preset=args.preset))
    spec = next(s for s in zoo.tasks if s.name == args.profile_task)
    scorer = build_scorer(read_task(spec), experts.tokenizer, args.batch_size, "cpu")
    model, tokenizer = experts.model, experts.tokenizer
    old = legacy_greedy()

    def before() -> list[str]:
        texts = [""] * len(scorer.answers)
        for batch in scorer.batches:
            for row, text in zip(batch.rows.tolist(), old(model, tokenizer, batch, spec.max_new_tokens, spec.stop)):
                texts[row] = text
        return texts

    def after() -> list[str]:
        return scorer.completions(model)

    same = before() == after()
    times = {"before": [], "after": []}
    outside = {"before": [], "after": []}
    inside = [0.0]
    for _ in range(args.repeats):
        for name, function in (("before", before), ("after", after)):
            with forward_timer(model, inside):
                inside[0] = 0.0
                times[name].append(timed(function))
            outside[name].append(times[name][-1] - inside[0])
    a, b = statistics.median(times["before"]), statistics.median(times["after"])
    oa, ob = statistics.median(outside["before"]), statistics.median(outside["after"])
    rows = [f"| {spec.name} ({len(scorer.answers)} examples, max {spec.max_new_tokens} new tokens) | {a:.3f} | "
            f"{b:.3f} | {a / b:.2f} | {oa:.3f} ({100 * oa / a:.0f}%) | {ob:.3f} ({100 * ob / b:.0f}%) | "
            f"{'identical' if same else 'DIFFERENT'} |"]
    print(rows[-1], flush=True)
    tables = []
    for name, function in (("before", before), ("after", after)):
        table, wall, ops = profile_table(function)
        tables.append(f"**{name}** ({'commit ' + BASELINE if name == 'before' else 'this commit'}): one scoring "
                      f"under the profiler, wall {wall:.3f} s, ops' self CPU total {ops:.3f} s "
                      f"({100 * (1 - ops / wall):.0f}% of the wall time outside torch ops)\n\n```\n{table}```\n")
    return rows, tables


def gpu_candidate_rows(args) -> list[str]:
    """Candidates per second and peak memory of MergeProblem at P = 1 (in place) and P > 1 (rows path)."""
    from benchmarks.throughput import build_setup

    device = torch.device(args.device)
    zoo = load_zoo(build_zoo(preset=args.preset))
    lines = ["| model | candidates per pass | candidates/s | peak GPU GiB | max abs score diff vs P=1 |",
             "| --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for label, hidden, layers in args.gpu_shapes:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            base_dir, adapter_dirs, parameters = build_setup(root, 8, 8, hidden, layers, args.seed)
            experts = ExpertSet.load(base_dir, adapter_dirs, device=device)
            tasks = fewshot_tasks(zoo, args.tasks, max(args.shots), args.seed, root)
            pop = torch.randn(args.population, experts.num_experts, generator=torch.Generator().manual_seed(0)) * 0.5
            reference = None
            for per_pass in args.per_pass:
                problem = MergeProblem(experts, tasks, batch_size=args.batch_size, candidates_per_pass=per_pass)
                problem.evaluate_per_task(pop[:per_pass])  # warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                scores = problem.evaluate_per_task(pop)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                reference = scores if reference is None else reference
                lines.append(f"| {label} ({parameters / 1e6:.0f} M) | {per_pass} | {args.population / seconds:.2f} | "
                             f"{memory:.2f} | {(scores - reference).abs().max().item():.1e} |")
                print(lines[-1], flush=True)
            del experts
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--shots", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile-task", default="reverse")
    parser.add_argument("--gpu-candidates", action="store_true", help="part 3 only: candidates per forward pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--per-pass", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--shapes", nargs="+", choices=["small", "1b"], default=["small", "1b"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--note", default="", help="what else ran on the machine, for the results file")
    args = parser.parse_args()
    shapes = {"small": ("small", 256, 4), "1b": ("1B-shaped", 1536, 28)}
    args.gpu_shapes = [shapes[name] for name in args.shapes]
    torch.set_num_threads(args.threads)
    load = [os.getloadavg()]
    argv = os.sys.argv[1:]
    if "--note" in argv:  # the note is in the file already
        del argv[argv.index("--note") : argv.index("--note") + 2]
    command = " ".join(["python -m benchmarks.below_floor", *argv])
    if args.gpu_candidates:
        lines = gpu_candidate_rows(args)
        load.append(os.getloadavg())
        out = args.out or Path("benchmarks/results/below_floor_gpu.md")
        out.write_text(render_gpu(args, command, load, lines))
        print(f"wrote {out}")
        return
    zoo = load_zoo(build_zoo(preset=args.preset))
    experts = ExpertSet.load(zoo.base_dir, zoo.adapter_dirs)
    with tempfile.TemporaryDirectory() as folder:
        prefix_lines, prefix_tables = shared_prefix_rows(args, experts, Path(folder))
    decoding, tables = decoding_rows(args, experts)
    load.append(os.getloadavg())
    report = render(args, command, load, prefix_lines, prefix_tables, decoding, tables, experts.num_experts)
    out = args.out or Path("benchmarks/results/below_floor.md")
    out.write_text(report)
    print(f"wrote {out}")


def render_gpu(args, command, load, lines) -> str:
    return f"""# Several candidates per forward pass, on a GPU

Command: `{command}` (load average over 1, 5, 15 min: {load[0][0]:.2f} / {load[0][1]:.2f} / {load[0][2]:.2f} at the
start, {load[1][0]:.2f} / {load[1][1]:.2f} / {load[1][2]:.2f} at the end, on {os.cpu_count()} cores). {args.note}

`MergeProblem(..., candidates_per_pass=P)` scores {args.population} random candidates (coefficients ~ N(0, 0.5^2))
on the `{args.preset}` zoo's {", ".join(args.tasks)} validation tasks at {max(args.shots)}-shot, plus language
modelling of the first generation task after the same demonstrations, batch size {args.batch_size}, float32, over
random-weight Qwen2 bases built from a config (no download) with 8 rank-8 LoRA experts. P = 1 is the in-place
merge (one forward pass per candidate); P > 1 runs the experts' factors unmerged with a coefficient per row. One
timed pass over the population after a warm-up, synchronised; the last column is the largest score difference
from P = 1 over all tasks and candidates.

{chr(10).join(lines)}

## Machine

{machine_markdown()}
"""


def render(args, command, load, prefix_lines, prefix_tables, decoding, tables, num_experts: int = 8) -> str:
    own = ("(`reverse`, `digit_sum`)" if args.preset in ("tiny", "micro", "small")
           else f"({', '.join(f'`{t}`' for t in args.tasks)})")
    positions = ("The zoo\nbase model was trained on 64 positions: 2-shot rows fit in them, 5-shot rows do not (its "
                 "5-shot scores mean\nnothing, only the speed and the agreement do)."
                 if args.preset in ("tiny", "micro", "small") else "")
    return f"""# Below the floor: shared prefixes, the decoding loop, candidates per pass

Command: `{command}` (load average over 1, 5, 15 min: {load[0][0]:.2f} / {load[0][1]:.2f} / {load[0][2]:.2f} at the
start, {load[1][0]:.2f} / {load[1][1]:.2f} / {load[1][2]:.2f} at the end, on {os.cpu_count()} cores). {args.note}

Settings: `{args.preset}` zoo base model with its {num_experts} experts, float32, {args.threads} thread(s), batch size
{args.batch_size}, {args.repeats} repeats, one random merge candidate (coefficients ~ N(0, 0.5^2), written in place)
per repeat, both paths timed under the same candidate one after the other; medians.

## 1. Shared prefixes ({" and ".join(map(str, args.shots))}-shot zoo tasks)

k demonstrations drawn from each validation file are the task's `prefix`; the other validation examples are
scored. *Plain*: every row runs its whole prompt (`min_shared_prefix=None`). *Shared*: the scorer's default
(`MIN_SHARED_PREFIX` tokens or more shared): the common token prefix once per candidate, every row continued
from its KV cache. The agreement column and the scores are taken under the task's own expert where the zoo has one
{own}, else under the first random candidate. The zoo's models write short completions after
few-shot prefixes (the characters column), so the generation rows are a weak check of identical decoding; the
strong one is `tests/test_prefix.py` (shared-prefix completions equal the plain path's and `model.generate`'s on a
model that writes full-length completions). The `_lm_` task is language modelling of prompt + answer after the same demonstrations. {positions}

| task | type | examples | shared tokens | mean tokens per example | plain s/candidate | shared s/candidate | speed-up | plain vs shared |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(prefix_lines)}

What the shared prefix cannot remove bounds the speed-up: each example's own tokens after the prefix, and for
multiple choice all of its choices (every path runs them; the `+ N in choices` above), so a task with long choices
gains less than one with short ones. Multiple choice after a shared prefix packs each example's choices into one row (`PackedChoiceBatch`: the prompt's
own tokens, then every choice in a slot of its own, a 4D mask letting each choice see only the prefix, its prompt
and itself), so the prefix's KV cache is expanded over the examples of a batch, not over examples x choices. Where
the time goes (torch.profiler, one scoring of the first multiple-choice task):

{chr(10).join(prefix_tables)}
## 2. Greedy decoding loop

The zoo's 0-shot `{args.profile_task}` validation task (base model; no shared prefix: the zoo's prompts share under
`MIN_SHARED_PREFIX` tokens). *Before*: `greedy_completions` of commit {BASELINE} (loaded from git into this
process), which decoded every row's text after every token to look for the stop strings and grew the attention
mask with `torch.cat`. *After*: stop checks on token ids (the stop string is one ASCII character), one decode per
row at the end, a preallocated attention mask sliced per step, per-step bookkeeping in tensor ops with one sync.

| task | before s | after s | speed-up | before: outside the model's forward s | after: outside s | completions |
| --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(decoding)}

*Outside the model's forward*: wall time minus the time inside the model's forward calls (timed by hooks on the
model), i.e. the decoding loop's own Python and tensor bookkeeping: all that a change to the loop can cut, and a
small share of the time to begin with. Most of the gap between wall time and torch-op time in the profiles below is
inside transformers' forward (module dispatch, mask creation, cache updates, output objects), once per generated
token, whatever the loop around it does. A transformers `StaticCache` in the same loop gave the same tokens and no gain in eager
mode on this CPU (a scratch comparison, one 32-row batch of this task, 15 interleaved repeats: 0.129 s with it,
0.129 s without), so it is not used; it pays off with `torch.compile` or CUDA graphs, not tried here. The two
profiles below are one call each under a changing load: read them for where the time goes, not as a timing
comparison (the interleaved medians in the table are that).

{chr(10).join(tables)}
## 3. Several candidates per forward pass

`MergeProblem(..., candidates_per_pass=P)` (`evox_merge/experts/rows.py`): the experts' factors run unmerged, with a
coefficient per row. Correctness is tested on CPU (`tests/test_batched_candidates.py`: equal to the in-place merge
to 1e-4 for the three task types, with and without a shared prefix). Its speed is a GPU matter, measured on an
NVIDIA H100 in [below_floor_gpu.md](below_floor_gpu.md) with

```bash
python -m benchmarks.below_floor --gpu-candidates --device cuda --population 16 --per-pass 1 4 8 16
```

## 4. Racing

Opt-in racing (`racing:` in a search or sweep config, `evox_merge/problems/racing.py`): its benchmark and a first
probe are in [racing.md](racing.md).

## Machine

{machine_markdown()}
"""


if __name__ == "__main__":
    main()
