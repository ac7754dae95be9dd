"""lm-evaluation-harness tasks and a chat template on a real instruct base (issue 31, point 4).

The smollm2 zoo (SmolLM2-135M-Instruct, 6 LoRA experts) with its four unseen tasks written as a user would bring
standard tasks: three as harness task YAMLs over the zoo's local JSONL files (multiple choice with ``acc``,
``generate_until`` with a regex filter, ``loglikelihood_rolling``) and one as a plain task put through the base's
chat template with a system prompt. Two steps:

- ``cost``: seconds per candidate of the same population scored on the search part of these tasks and of the
  zoo's plain JSONL tasks (what ``evox-merge search --zoo --preset smollm2`` scores), interleaved, in one process;
- ``search``: ``evox-merge search`` on the harness/chat tasks (EvoGM default, the zoo search's budget), as the
  command line runs it; the release packet goes to ``<out>/run``.

Files: ``<out>/harness/*.yaml``, ``<out>/tasks.yaml``, ``<out>/config.yaml`` (written by either step), and
``benchmarks/results/harness_smollm2.md`` with ``harness_smollm2.json`` (``report``).

Run: python -m benchmarks.harness_smollm2 cost; python -m benchmarks.harness_smollm2 search;
     python -m benchmarks.harness_smollm2 report
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

RESULTS = Path(__file__).parent / "results"
DEFAULT_OUT = Path("runs/harness_smollm2")
SYSTEM_PROMPT = "Answer with one word."
REPEATS = 3
POPULATION = 4

_METRICS = {"acc": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "exact_match": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}


def harness_yamls(tasks_dir: Path) -> dict[str, dict]:
    """Harness task configs over the zoo's unseen task files (validation for search and selection, test for test)."""

    def files(name: str) -> dict:
        return {"dataset_path": "json",
                "dataset_kwargs": {"data_files": {"validation": str(tasks_dir / name / "validation.jsonl"),
                                                  "test": str(tasks_dir / name / "test.jsonl")}},
                "validation_split": "validation", "test_split": "test"}

    return {
        "zoo_names_syllables": {"task": "zoo_names_syllables", **files("names_syllables"),
                                "fewshot_split": "validation", "output_type": "multiple_choice",
                                "doc_to_text": "{{prompt}}",
                                "doc_to_choice": "choices", "doc_to_target": "answer", "target_delimiter": "",
                                "metric_list": _METRICS["acc"]},
        "zoo_syllables_stopword": {"task": "zoo_syllables_stopword", **files("syllables_stopword"),
                                   "output_type": "generate_until", "doc_to_text": "{{prompt}}",
                                   "doc_to_target": "{{answer}}",
                                   "generation_kwargs": {"until": ["\n"], "max_gen_toks": 3, "do_sample": False},
                                   "filter_list": [{"name": "word", "filter": [
                                       {"function": "regex", "regex_pattern": r"([a-z0-9]+)"},
                                       {"function": "take_first"}]}],
                                   "metric_list": _METRICS["exact_match"]},
        "zoo_prose": {"task": "zoo_prose", **files("prose"), "output_type": "loglikelihood_rolling",
                      "doc_to_text": "", "doc_to_target": "{{text}}",
                      "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                      {"metric": "bits_per_byte"}]},
    }


def write_inputs(out: Path) -> tuple[Path, list[dict], list]:
    """The smollm2 zoo (built into its cache if missing), the harness YAMLs, tasks.yaml and config.yaml under
    `out`; returns config.yaml's path, the harness/chat task list and the zoo's plain unseen specs."""
    from evox_merge.run.zoo_search import zoo_paths

    out = out.resolve()
    base, experts, _, unseen = zoo_paths("smollm2", 0)
    tasks_dir = Path(base).parent / "tasks"
    harness = out / "harness"
    harness.mkdir(parents=True, exist_ok=True)
    for name, config in harness_yamls(tasks_dir).items():
        (harness / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    tasks = [{"lm_eval": "zoo_names_syllables", "include_path": str(harness), "metric": "acc", "num_fewshot": 3},
             {"lm_eval": "zoo_syllables_stopword", "include_path": str(harness)},
             {"lm_eval": "zoo_prose", "include_path": str(harness)},
             {"name": "stopword_gender_chat", "type": "multiple_choice",
              "path": str(tasks_dir / "stopword_gender" / "validation.jsonl"),
              "test_path": str(tasks_dir / "stopword_gender" / "test.jsonl"),
              "chat_template": {"system": SYSTEM_PROMPT}}]
    (out / "tasks.yaml").write_text(yaml.safe_dump(tasks, sort_keys=False))
    config = {"base": base, "experts": experts, "tasks": "tasks.yaml",
              "algorithm": {"name": "evogm", "pop_size": 2 * len(experts),
                            "params": {"num_rounds": 2, "iterations_per_round": 3}},
              "budget": {"generations": 8}, "seed": 0, "batch_size": 128, "max_validation_examples": 30,
              "output_dir": str(out / "run"),
              "intended_use": "Benchmark: harness tasks and a chat-templated task on the smollm2 zoo (issue 31)."}
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out / "config.yaml", tasks, unseen


def measure_cost(out: Path) -> dict:
    """Seconds per candidate, harness/chat tasks against the zoo's plain tasks, the same population, interleaved."""
    import torch

    from evox_merge.experts import ExpertSet
    from evox_merge.problems.merge_problem import MergeProblem
    from evox_merge.run.config import load_config
    from evox_merge.tasks import read_task, split_task

    config_path, _, plain = write_inputs(out)
    config = load_config(config_path)
    harness_specs = config.task_specs(config_path.parent)
    experts = ExpertSet.load(config.base, config.experts)
    problems = {}
    for label, specs in (("harness_and_chat", harness_specs), ("plain_jsonl", plain)):
        parts = [split_task(read_task(spec), 0.3, 30) for spec in specs]
        problems[label] = MergeProblem(experts, [search for search, _ in parts], batch_size=128)
    torch.manual_seed(0)
    population = torch.rand(POPULATION, experts.num_experts) * 0.6
    seconds: dict[str, list[float]] = {label: [] for label in problems}
    for _ in range(REPEATS):
        for label, problem in problems.items():
            started = time.perf_counter()
            problem.evaluate_per_task(population)
            seconds[label].append((time.perf_counter() - started) / POPULATION)
    return {label: {"seconds_per_candidate": min(values), "all": values,
                    "tasks": problems[label].task_names, "examples": problems[label].examples_total}
            for label, values in seconds.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("cost", "search", "report"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    facts_path = RESULTS / "harness_smollm2.json"
    facts = json.loads(facts_path.read_text()) if facts_path.exists() else {}
    if args.step == "cost":
        import torch

        torch.set_num_threads(1)
        facts["cost"] = measure_cost(args.out)
    elif args.step == "search":
        config_path, _, _ = write_inputs(args.out)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "evox_merge.cli", "search", str(config_path),
                               "--quiet"], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"the search failed ({done.returncode}):\n{done.stderr[-3000:]}")
        recipe = json.loads((args.out / "run" / "recipe.json").read_text())
        printed = done.stdout[done.stdout.index("Released:"):].rstrip()
        facts["search"] = {"wall_seconds": time.perf_counter() - started, "resources": recipe.get("resources"),
                           "lm_eval": {f["name"]: f.get("lm_eval") for f in recipe["evaluation"]["task_files"]},
                           "table": ["What it printed:", "", "```", printed, "```"], **record_facts(args.out)}
    if args.step == "report" and facts.get("search") is not None and "records" not in facts["search"]:
        facts["search"].update(record_facts(args.out))
        facts_path.write_text(json.dumps(facts, indent=1) + "\n")
    if args.step != "report":
        from evox_merge.util.machine import host_description

        facts["host"] = host_description()
        facts_path.write_text(json.dumps(facts, indent=1) + "\n")
    write_report(facts, args.out)


def record_facts(out: Path) -> dict:
    """How many candidates the search scored and the sum of their scoring seconds (records.jsonl)."""
    path = out / "run" / "records.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    return {"records": len(records), "record_seconds": sum(r.get("seconds") or 0 for r in records)}


def write_report(facts: dict, out: Path) -> None:
    """benchmarks/results/harness_smollm2.md from the facts recorded so far (harness_smollm2.json)."""
    lines = ["# Harness tasks and a chat template on a real instruct base (issue 31, point 4)", "",
             "Generated by `python -m benchmarks.harness_smollm2 report` from `harness_smollm2.json`. The smollm2 "
             "zoo (SmolLM2-135M-Instruct base, 6 LoRA experts) with its four unseen tasks as a user would bring "
             "standard tasks: `names_syllables` as a harness `multiple_choice` task (acc, 3-shot from its "
             "validation split), `syllables_stopword` as a "
             "harness `generate_until` task with a regex filter (exact_match), `prose` as a harness "
             "`loglikelihood_rolling` task, all three from harness task YAMLs over the zoo's local JSONL files "
             "(`dataset_path: json`), and `stopword_gender` as a plain task through the base's chat template with "
             f"the system prompt \"{SYSTEM_PROMPT}\". The YAMLs, tasks.yaml and config.yaml are written by the "
             "script (`harness_yamls`, `write_inputs`).", "",
             f"Machine: {facts.get('host', 'not recorded')}; torch 1 thread; other jobs ran beside it (a sweep "
             "on the other core).", ""]
    cost = facts.get("cost")
    if cost:
        lines += ["## Cost per candidate", "",
                  f"The same {POPULATION} random candidates scored on the search part (the first 30 examples per "
                  "task at most of the 70% of each 32-example validation file left after the selection part: 22), "
                  f"{REPEATS} times interleaved, fastest kept (`evaluate_per_task`, batch size 128):", "",
                  "| tasks | seconds per candidate (fastest) | all repeats | examples | tasks |",
                  "| --- | --- | --- | --- | --- |"]
        for label, row in cost.items():
            lines.append(f"| {label} | {row['seconds_per_candidate']:.2f} | "
                         f"{', '.join(f'{v:.2f}' for v in row['all'])} | {row['examples']} | "
                         f"{', '.join(row['tasks'])} |")
        plain, harness = cost["plain_jsonl"]["seconds_per_candidate"], cost["harness_and_chat"]["seconds_per_candidate"]
        lines += ["", f"Ratio harness-and-chat / plain JSONL: {harness / plain:.2f}x (the harness tasks' prompts "
                  "include their few-shot formatting and the chat template adds the template's tokens to every "
                  "prompt; the scoring path is the same).", ""]
    search = facts.get("search")
    if search:
        lines += ["## The search", "", f"`evox-merge search {out}/config.yaml`: EvoGM (default), P = 12, "
                  "8 generations = 96 evaluations, search part 22 examples per task (`max_validation_examples: 30` of "
                  "the 70% of each 32-example validation file left after the selection part), seed 0; started from "
                  "the static merges; the contest held the 16 data-free static merges (the default then; now 6). Wall time "
                  f"{search['wall_seconds'] / 60:.1f} min.", ""]
        resources = search.get("resources") or {}
        if resources:
            lines += [f"recipe.json's resources: {resources.get('wall_seconds', 0) / 60:.1f} min wall, peak memory "
                      f"{resources.get('peak_memory_mb', 0) / 1024:.1f} GiB, dtype {resources.get('dtype')}.", ""]
        lines += search.get("table", [])
        if search.get("record_seconds") is not None:
            lines += ["", f"The {search['records']} searched candidates' own scoring took "
                      f"{search['record_seconds'] / 60:.1f} min (the sum of records.jsonl's `seconds`); the rest of "
                      "the wall time went to tuning the static "
                      "merges before the search (`algorithm.start: static`) and scoring the contest on the selection "
                      "and test parts."]
    if facts.get("observations"):
        lines += ["", "## Observed while it ran", ""] + [f"- {line}" for line in facts["observations"]]
    (RESULTS / "harness_smollm2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
