"""Every bad input is a handled error: one table, one case per input (docs/errors.md is generated from it).

Each case builds its bad input in a fresh workspace (copies of the tiny fixture's base, three experts and task
files, a config with paths relative to it), runs the CLI command or function a user would, and asserts:

* the error class (a subclass of `EvoxMergeError`, so the CLI exits with status 2 and no traceback);
* the message, which names the file or key and what was expected;
* for inputs that are knowable without the model, that the model never loads (`_load_base_model` fails the test);
* that nothing in the workspace changed (every file's bytes, before and after): a refused input touches nothing.

``EVOX_MERGE_WRITE_ERRORS_DOC=1 python -m pytest -q tests/test_errors.py`` rewrites docs/errors.md from the
messages the cases got; without it, the last test fails when the file and the table disagree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import error_cases_inputs
import error_cases_refusals
import error_cases_runs
import error_cases_writes
import error_harness
import evox_merge.experts.expert_set as expert_set_module
from error_harness import (TASK_NAMES, Case, Workspace, cli, dense_expert, foreign_adapter, normalise, search,
                           tree)
from evox_merge.cli import main
from evox_merge.run import registry
from evox_merge.run.config import constructor_parameters, load_config
from evox_merge.run.output_dir import prepare_output
from evox_merge.tasks import TaskSpec
from evox_merge.util.errors import EvoxMergeError, MergeInputError, RunStateError
from evox_merge.zoo.char_tokenizer import build_char_tokenizer

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def _overwrite_in_working_folder(ws: Workspace) -> None:
    (ws.root / "notes.txt").write_text("the user's own file")
    search(ws, "--overwrite", output_dir=".")


def _overwrite_run_holding_an_input(ws: Workspace) -> None:
    out = ws.start_run()
    shutil.copytree(ws.root / "expert_2", out / "best" / "adapter")
    search(ws, "--overwrite", experts=["expert_0", "expert_1", "out/best/adapter"])


def _truncate_base(ws: Workspace) -> None:
    path = ws.root / "base" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    search(ws)


def _zero_byte_checkpoint(ws: Workspace) -> None:
    out = ws.start_run()
    (out / "checkpoint.pt").write_bytes(b"")
    search(ws, "--resume")


def _records_shorter_than_checkpoint(ws: Workspace) -> None:
    out = ws.start_run()
    torch.save({"workflow": {}, "torch_rng": None, "python_rng": None, "numpy_rng": None,
                "counters": {"generation": 2, "records": 8, "best": 0.0, "elapsed": 1.0}}, out / "checkpoint.pt")
    (out / "records.jsonl").write_text(json.dumps({"id": 0}) + "\n" + '{"id": 1, "half')
    search(ws, "--resume")


def _larger_tokenizer(ws: Workspace) -> None:
    alphabet = "".join(chr(code) for code in range(0x400, 0x4c0))  # 192 Cyrillic characters, more than 90 rows
    build_char_tokenizer(alphabet).save_pretrained(ws.root / "big_tokenizer")
    search(ws, tokenizer="big_tokenizer")


def _smaller_tokenizer(ws: Workspace) -> None:
    build_char_tokenizer("abcdef").save_pretrained(ws.root / "small_tokenizer")
    search(ws, tokenizer="small_tokenizer")


def _nan_lora_b(ws: Workspace) -> None:
    def poison(tensors):
        key = sorted(k for k in tensors if "lora_B" in k)[0]
        tensors[key][0, 0] = float("nan")
    ws.edit_tensors("expert_1", poison)
    search(ws)


def _inf_lora_a(ws: Workspace) -> None:
    def poison(tensors):
        key = sorted(k for k in tensors if "lora_A" in k)[-1]
        tensors[key][1, 2] = float("inf")
    ws.edit_tensors("expert_0", poison)
    search(ws)


def _dense_other_architecture(ws: Workspace) -> None:
    search(ws, experts=["expert_0", dense_expert(ws, config_edit=lambda c: c.update(intermediate_size=256))])


def _dense_missing_tensor(ws: Workspace) -> None:
    search(ws, experts=["expert_0", dense_expert(ws, edit=lambda t: t.pop("model.norm.weight"))])


def _dense_other_vocabulary(ws: Workspace) -> None:
    def grow(tensors):
        tensors["model.embed_tokens.weight"] = torch.cat([tensors["model.embed_tokens.weight"]] * 2)
    search(ws, experts=["expert_0", dense_expert(ws, edit=grow)])


def _dense_nan(ws: Workspace) -> None:
    def poison(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    search(ws, experts=["expert_0", dense_expert(ws, edit=poison)])


def _evaluate_foreign_adapter(ws: Workspace) -> None:
    cli("evaluate", "--model", ws.root / "base", "--adapter", foreign_adapter(ws.root), "--tasks", ws.tasks_file())


def _unknown_keys_and_bad_values(ws: Workspace) -> None:
    search(ws, algoritm={}, batch_size=0)


CORE_CASES = [
    # 1. Nothing lost: --overwrite deletes only a previous run, never what the config reads.
    Case("overwrite_working_folder", "`output_dir: \".\"` (config and data in it, no previous run) with "
         "`search --overwrite`", _overwrite_in_working_folder, MergeInputError,
         r"--overwrite refused: .* holds no previous run \(run\.json missing\).*deletes only its own runs"),
    Case("overwrite_run_holding_an_input", "`--overwrite` of a previous run whose `best/adapter` is an expert of "
         "the new config", _overwrite_run_holding_an_input, MergeInputError,
         r"--overwrite refused: the config reads .*out/best/adapter.*inside the previous run"),
    Case("output_dir_not_empty", "`output_dir` holding other files, without --resume or --overwrite",
         lambda ws: ((ws.root / "out").mkdir(), (ws.root / "out" / "x.txt").write_text("x"), search(ws)),
         MergeInputError, r"output directory .*out is not empty: pass --resume .* or --overwrite"),
    # 2. Former tracebacks.
    Case("base_config_not_json", "base `config.json` that is not JSON",
         lambda ws: ((ws.root / "base" / "config.json").write_text('{"model_type": "qwen2",\n oops}'), search(ws)),
         MergeInputError, r"base: .*base/config\.json is not valid JSON \(.* at line 2, column 2\)"),
    Case("base_weights_truncated", "base `model.safetensors` cut in half", _truncate_base, MergeInputError,
         r"base: cannot load the model from .*base.* \(SafetensorError: .*\); expected a complete save_pretrained",
         before_model=False),
    Case("task_line_not_utf8", "a byte that is not UTF-8 in a task line",
         lambda ws: (ws.line("copy", b'{"prompt": "caf\xe9", "answer": "x"}'), search(ws)), MergeInputError,
         r"tasks\.copy\.path: .*copy_validation\.jsonl:13: not UTF-8 text \(byte 0xe9 at column 16\)"),
    Case("template_unclosed", "`prompt_template: \"{prompt\"`",
         lambda ws: search(ws, tasks=[ws.task("copy", prompt_template="{prompt")]), MergeInputError,
         r"tasks: task 'copy': prompt_template '\{prompt' is not a valid template .*write a literal brace"),
    Case("template_not_string", "`prompt_template: 5`",
         lambda ws: search(ws, tasks=[ws.task("copy", prompt_template=5)]), MergeInputError,
         r"task 'copy': field 'prompt_template' must be a string such as '\{prompt\}', got 5"),
    Case("template_positional", "`prompt_template: \"{}\"`",
         lambda ws: search(ws, tasks=[ws.task("copy", prompt_template="Q: {}")]), MergeInputError,
         r"task 'copy': prompt_template 'Q: \{\}' uses a positional field \{\}; name a record field"),
    Case("max_new_tokens_string", "`max_new_tokens: \"11\"` in a task",
         lambda ws: search(ws, tasks=[ws.task("copy", max_new_tokens="11")]), MergeInputError,
         r"task 'copy': field 'max_new_tokens' must be an integer >= 1, got '11'"),
    Case("weight_string", "`weight: \"1\"` in a task",
         lambda ws: search(ws, tasks=[ws.task("copy", weight="1")]), MergeInputError,
         r"task 'copy': field 'weight' must be a number >= 0, got '1'"),
    Case("algorithm_params_unknown", "`algorithm.params: {bogus: 1}`",
         lambda ws: search(ws, algorithm={"name": "random", "params": {"bogus": 1}}), MergeInputError,
         r"algorithm\.params\.bogus: RandomSearch takes no such argument; it takes none \(pop_size, lb, ub, seed "
         r"and device are config keys"),
    Case("algorithm_params_reserved", "`algorithm.params: {pop_size: 8}` (set by the search itself)",
         lambda ws: search(ws, algorithm={"name": "evogm", "params": {"pop_size": 8}}), MergeInputError,
         r"algorithm\.params\.pop_size: set by the search itself .* use the algorithm's own config key"),
    Case("release_rule_unknown", "`release: {rule: clear}`",
         lambda ws: search(ws, release={"rule": "clear"}), MergeInputError,
         r"release\.rule: .*'best' or 'significant'"),
    Case("output_dir_is_file", "`output_dir` that is a file",
         lambda ws: ((ws.root / "out").write_text("x"), search(ws)), MergeInputError,
         r"output_dir: .*out is a file; expected a directory"),
    Case("checkpoint_empty", "a 0-byte `checkpoint.pt` on `--resume`", _zero_byte_checkpoint, RunStateError,
         r"out/checkpoint\.pt: not a readable checkpoint \(EOFError.*start again with --overwrite"),
    Case("records_shorter_than_checkpoint", "`records.jsonl` shorter than the checkpoint on `--resume`",
         _records_shorter_than_checkpoint, RunStateError,
         r"records\.jsonl holds 1 complete records but .*checkpoint\.pt covers 8: records were lost"),
    Case("apply_run_missing", "`evox-merge apply --run /nonexistent`",
         lambda ws: cli("apply", "--run", ws.root / "nonexistent", "--out", ws.root / "merged"), EvoxMergeError,
         r"--run: .*nonexistent does not exist; expected a finished search's output directory"),
    Case("apply_run_unfinished", "`apply --run` on a search that has not finished (no recipe.json)",
         lambda ws: cli("apply", "--run", ws.start_run(), "--out", ws.root / "merged"), EvoxMergeError,
         r"--run: .*out holds no recipe\.json; expected a finished search's output directory"),
    Case("apply_coefficient_not_number", "`apply --coefficients 0.5,abc`",
         lambda ws: cli("apply", "--base", ws.root / "base", "--experts", ws.root / "expert_0", ws.root / "expert_1",
                        "--coefficients", "0.5,abc", "--out", ws.root / "merged"), EvoxMergeError,
         r"--coefficients: value #1 'abc' is not a number; expected comma-separated numbers"),
    Case("evaluate_adapter_missing", "`evaluate --adapter` that does not exist",
         lambda ws: cli("evaluate", "--model", ws.root / "base", "--adapter", ws.root / "nope", "--tasks",
                        ws.tasks_file()), MergeInputError, r"--adapter: .*nope does not exist \(expected a local "),
    Case("evaluate_adapter_other_base", "`evaluate --adapter` trained from another base",
         _evaluate_foreign_adapter, MergeInputError,
         r"foreign/adapter_model\.safetensors: module .* give a \(32, 32\) delta but the base layer is \(64, 64\)",
         before_model=False),
    Case("evaluate_batch_size_zero", "`evaluate --batch-size 0` (on a generation task)",
         lambda ws: cli("evaluate", "--model", ws.root / "base", "--tasks", ws.tasks_file(), "--batch-size", "0"),
         MergeInputError, r"--batch-size: must be an integer >= 1, got 0"),
    # 3. Formerly accepted silently.
    Case("tokenizer_larger_than_model", "a tokenizer with more tokens than the model has embedding rows",
         _larger_tokenizer, MergeInputError,
         r"tokenizer: .*big_tokenizer has 196 tokens \(ids up to 195\) but .*config\.json vocab_size has 90 rows"),
    Case("tokenizer_smaller_than_model", "another model's smaller tokenizer (10 tokens for 90 embedding rows)",
         _smaller_tokenizer, MergeInputError,
         r"tokenizer: .*small_tokenizer has 10 tokens but .* has 90 rows \(under 90% of them used\): it is another"),
    Case("task_names_duplicate", "two inline tasks with the same name",
         lambda ws: search(ws, tasks=[ws.task("copy"), ws.task("copy", max_new_tokens=4)]), MergeInputError,
         r"tasks: duplicate task name\(s\) \['copy'\]; every task needs its own name"),
    Case("apply_coefficient_nan", "`apply --coefficients nan,0.5`",
         lambda ws: cli("apply", "--base", ws.root / "base", "--experts", ws.root / "expert_0", ws.root / "expert_1",
                        "--coefficients", "nan,0.5", "--out", ws.root / "merged"), EvoxMergeError,
         r"--coefficients: value #0 is 'nan'; expected finite numbers"),
    Case("apply_rank_zero", "`apply --rank 0`",
         lambda ws: cli("apply", "--base", ws.root / "base", "--experts", ws.root / "expert_0", ws.root / "expert_1",
                        "--coefficients", "0.5,0.5", "--rank", "0", "--out", ws.root / "merged"), EvoxMergeError,
         r"--rank: must be >= 1, got 0"),
    Case("choices_duplicate", "a multiple-choice line whose choices repeat",
         lambda ws: (ws.line("choice", '{"prompt": "q", "choices": ["a", "b", "a"], "answer": 1}'), search(ws)),
         MergeInputError, r"choice_validation\.jsonl:13: field 'choices' repeats \['a'\]; expected distinct"),
    Case("expert_lora_b_nan", "NaN in an expert's `lora_B`", _nan_lora_b, MergeInputError,
         r"expert_1/adapter_model\.safetensors: tensor '.*lora_B\.weight' holds 1 NaN/inf value\(s\)"),
    Case("expert_lora_a_inf", "inf in an expert's `lora_A`", _inf_lora_a, MergeInputError,
         r"expert_0/adapter_model\.safetensors: tensor '.*lora_A\.weight' holds 1 NaN/inf value\(s\)"),
    # 4. Formerly checked only after the model loaded.
    Case("task_line_malformed", "a malformed JSON line in a task file (reported with its column)",
         lambda ws: (ws.line("text", '{"text": "a" "b"}'), search(ws)), MergeInputError,
         r"tasks\.text\.path: .*text_validation\.jsonl:13: malformed JSON \(Expecting ',' delimiter at column 14\)"),
    Case("task_line_in_test_file", "a bad line in a task's test file",
         lambda ws: (ws.line("copy", '{"prompt": "p"}', split="test"), search(ws)), MergeInputError,
         r"tasks\.copy\.test_path: .*copy_test\.jsonl:13: missing field 'answer'"),
    Case("tasks_empty", "`tasks: []`", lambda ws: search(ws, tasks=[]), MergeInputError,
         r"tasks: no tasks; expected at least one task spec"),
    Case("task_weights_all_zero", "every task with `weight: 0`",
         lambda ws: search(ws, tasks=[ws.task(n, weight=0) for n in TASK_NAMES]), MergeInputError,
         r"tasks: every task has weight 0; expected at least one positive weight"),
    # 7. Messages that named the wrong thing.
    Case("apply_base_missing", "`apply --base` a folder that does not exist",
         lambda ws: cli("apply", "--base", ws.root / "nobase", "--experts", ws.root / "expert_0",
                        ws.root / "expert_1", "--coefficients", "0.5,0.5", "--out", ws.root / "merged"),
         MergeInputError, r"base: .*nobase does not exist \(expected a local directory or a Hugging Face Hub id"),
    Case("evaluate_model_missing", "`evaluate --model` a folder that does not exist",
         lambda ws: cli("evaluate", "--model", ws.root / "nomodel", "--tasks", ws.tasks_file()), MergeInputError,
         r"--model: .*nomodel does not exist \(expected a local directory or a Hugging Face Hub id"),
    Case("expert_is_file", "an existing file given as an expert directory",
         lambda ws: ((ws.root / "expert.txt").write_text("x"), search(ws, experts=["expert_0", "expert.txt"])),
         MergeInputError, r"experts\[1\]: .*expert\.txt is a file; expected a model or adapter directory"),
    Case("expert_missing_relative", "a relative expert path that does not exist (looks like a Hub id)",
         lambda ws: search(ws, experts=["expert_0", "adapters/math"]), MergeInputError,
         r"experts\[1\]: adapters/math is neither a local directory \(.*adapters/math does not exist\) nor in the "
         r"local Hugging Face cache .*HF_HUB_OFFLINE is set"),
    # 8. Hub ids that the cache lacks.
    Case("hub_id_not_cached", "`base: org/missing-model` not in the Hub cache, offline",
         lambda ws: search(ws, base="org/missing-model"), MergeInputError,
         r"base: org/missing-model is neither a local directory .* nor in the local Hugging Face cache \(.*hub\); "
         r"HF_HUB_OFFLINE is set"),
    # Bad inputs that were already handled (kept here so the table is complete).
    Case("config_unknown_key_and_bad_value", "an unknown key and `batch_size: 0`", _unknown_keys_and_bad_values,
         MergeInputError, r"batch_size: Input should be greater than or equal to 1.*algoritm: unknown key"),
    Case("algorithm_unknown", "`algorithm.name: evogn`", lambda ws: search(ws, algorithm={"name": "evogn"}),
         MergeInputError, r"algorithm\.name: unknown algorithm 'evogn': use one of \['evogm'"),
    Case("expert_missing_absolute", "an expert folder that does not exist",
         lambda ws: search(ws, experts=["expert_0", str(ws.root / "gone")]), MergeInputError,
         r"experts\[1\]: .*gone does not exist"),
    Case("task_file_missing", "a task file that does not exist",
         lambda ws: search(ws, tasks=[ws.task("copy", path="data/nope.jsonl")]), MergeInputError,
         r"tasks\.copy\.path: .*data/nope\.jsonl does not exist"),
    Case("task_answer_not_a_choice", "a multiple-choice answer that is not one of the choices",
         lambda ws: (ws.line("choice", '{"prompt": "q", "choices": ["a", "b"], "answer": "c"}'), search(ws)),
         MergeInputError, r"choice_validation\.jsonl:13: answer 'c' is not one of the choices"),
    Case("resume_task_file_changed", "`--resume` after a task file changed under a checkpointed run",
         lambda ws: (torch.save({"workflow": {}, "torch_rng": None, "python_rng": None, "numpy_rng": None,
                                 "counters": {"records": 0}}, ws.start_run() / "checkpoint.pt"),
                     ws.line("copy", '{"prompt": "p", "answer": "x"}'), search(ws, "--resume")),
         MergeInputError, r"--resume refused: task file\(s\) changed since the run started: .*copy_validation"),
    Case("expert_weights_corrupt", "an expert's `adapter_model.safetensors` that is not safetensors",
         lambda ws: ((ws.root / "expert_1" / "adapter_model.safetensors").write_bytes(b"junk"), search(ws)),
         MergeInputError, r"expert_1/adapter_model\.safetensors: not a readable safetensors file"),
    Case("expert_too_few", "one expert", lambda ws: search(ws, experts=["expert_0"]), MergeInputError,
         r"experts: List should have at least 2 items"),
    # 9. Objective groups (issue 16).
    Case("objectives_unknown_task", "`objectives: {kind: pareto, groups: [[choice, nope], [text]]}`",
         lambda ws: search(ws, objectives={"kind": "pareto", "groups": [["choice", "nope"], ["text"]]}),
         MergeInputError, r"objectives\.groups\[0\]: unknown task 'nope'; the tasks are \['choice', 'copy', 'text'\]"),
    Case("objectives_task_in_two_groups", "`objectives: {kind: pareto, groups: [[choice, copy], [copy, text]]}`",
         lambda ws: search(ws, objectives={"kind": "pareto", "groups": [["choice", "copy"], ["copy", "text"]]}),
         MergeInputError, r"objectives\.groups\[1\]: task 'copy' is already in objectives\.groups\[0\]"),
    Case("objectives_empty_group", "`objectives: {kind: pareto, groups: [[choice], []]}`",
         lambda ws: search(ws, objectives={"kind": "pareto", "groups": [["choice"], []]}),
         MergeInputError, r"objectives\.groups\[1\]: empty group; expected at least one task name"),
    Case("objectives_mean_with_nsga2", "`algorithm.name: nsga2` with `objectives: mean`",
         lambda ws: search(ws, algorithm={"name": "nsga2", "pop_size": 4}), MergeInputError,
         r"algorithm\.name: 'nsga2' is multi-objective; set objectives: pareto"),
    Case("racing_with_pso", "`racing: {}` with `algorithm.name: pso`",
         lambda ws: search(ws, algorithm={"name": "pso", "pop_size": 4}, racing={}), MergeInputError,
         r"racing: algorithm 'pso' does not say which candidates it ranks by"),
    Case("racing_stages_not_increasing", "`racing: {stages: [0.5, 0.4, 1.0]}`",
         lambda ws: search(ws, racing={"stages": [0.5, 0.4, 1.0]}), MergeInputError,
         r"racing\.stages: .*expected fractions increasing within \(0, 1\] and ending at 1"),
    Case("space_layer_without_groups", "`space: {kind: layer}`",
         lambda ws: search(ws, space={"kind": "layer"}), MergeInputError,
         r"space: .*kind 'layer' with by: blocks needs groups: K"),
    Case("space_too_many_groups", "`space: {kind: layer, groups: 9}` for experts targeting 2 blocks",
         lambda ws: search(ws, space={"kind": "layer", "groups": 9}), MergeInputError,
         r"space\.groups must be an integer from 1 to 2"),
    # Dense (fully fine-tuned) experts: checked against the base's config and safetensors headers.
    Case("dense_other_architecture", "a dense expert whose config.json has another `intermediate_size`",
         _dense_other_architecture, MergeInputError,
         r"dense_0/config.json: another architecture than the base .*intermediate_size: 256 vs the base's 128"),
    Case("dense_missing_tensor", "a dense expert without `model.norm.weight`", _dense_missing_tensor,
         MergeInputError, r"dense_0: lacks tensor 'model.norm.weight' of the base"),
    Case("dense_other_vocabulary", "a dense expert whose embedding has twice the rows", _dense_other_vocabulary,
         MergeInputError, r"dense_0/model.safetensors: tensor 'model.embed_tokens.weight' has shape \[180, 64\] "
         r"but the base's is \[90, 64\]"),
    Case("dense_nan", "a NaN in a dense expert's `up_proj` weight", _dense_nan, MergeInputError,
         r"dense_0/model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' holds 1 NaN/inf value", False),
    Case("dense_svd_without_rank", "`dense: {mode: svd}`", lambda ws: search(ws, dense={"mode": "svd"}),
         MergeInputError, r"dense: .*rank: needed with mode: svd"),
    Case("mergevolve_with_pareto", "`mergevolve: {}` with `objectives: pareto`",
         lambda ws: search(ws, algorithm={"name": "nsga2", "pop_size": 4}, objectives="pareto", mergevolve={}),
         MergeInputError, r"mergevolve: runs after a mean-objective search in one process"),
]


# Each area's cases live in its own module (tests/error_cases_*.py); the table and docs/errors.md hold them all.
CASES = [*CORE_CASES, *error_cases_writes.CASES, *error_cases_inputs.CASES, *error_cases_runs.CASES,
         *error_cases_refusals.CASES]

MESSAGES: dict[str, str] = {}


@pytest.fixture(autouse=True)
def offline_hub(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "hub"))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_a_handled_error(case, tiny_setup, tmp_path, monkeypatch):
    root = tmp_path / "ws"
    root.mkdir()
    ws = Workspace(root, tiny_setup)
    monkeypatch.chdir(root)
    if case.before_model:
        def must_not_load(*args, **kwargs):
            raise AssertionError(f"{case.id}: the model loaded, though the input is knowable before")
        monkeypatch.setattr(expert_set_module, "_load_base_model", must_not_load)
    # `make` builds the bad input and then runs a command: snapshot the workspace as the command starts.
    original_tree = None

    def snapshot():
        nonlocal original_tree
        original_tree = tree(root)

    monkeypatch.setattr(error_harness, "BEFORE_COMMAND", [snapshot])
    with pytest.raises(case.error) as raised:
        case.make(ws)
    assert isinstance(raised.value, EvoxMergeError)
    message = str(raised.value)
    assert re.search(case.message, message), f"{case.id}: {message}"
    assert original_tree is not None
    assert tree(root) == original_tree, f"{case.id}: the workspace changed"
    MESSAGES[case.id] = normalise(message, root)


def test_cli_exits_with_status_2_and_one_line(tiny_setup, tmp_path, monkeypatch, capsys):
    ws = Workspace(tmp_path, tiny_setup)
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(ws.write_config(batch_size="many")), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evox-merge: error: invalid search config: batch_size:") and "Traceback" not in err


def test_ast_params_agree_with_the_constructors():
    import inspect

    for name, entry in registry.ALGORITHMS.items():
        class_name, names, kwargs = constructor_parameters(name)
        parameters = inspect.signature(entry.load().__init__).parameters
        assert class_name == entry.load().__name__
        assert names == set(parameters) - {"self"}, name
        assert kwargs == any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def test_bad_config_fails_fast_without_heavy_imports(tiny_setup, tmp_path):
    """A bad config fails before torch, transformers or EvoX are imported (a fresh interpreter)."""
    import subprocess
    import sys

    ws = Workspace(tmp_path, tiny_setup)
    path = ws.write_config(algorithm={"name": "evogm", "params": {"bogus": 1}})
    code = ("import sys, time; t = time.perf_counter(); from evox_merge.cli import main; "
            f"rc = main(['search', {str(path)!r}]); "
            "print(rc, [m for m in ('torch', 'transformers', 'evox') if m in sys.modules], "
            "round(time.perf_counter() - t, 3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    rc, heavy = out.stdout.split(" [")[0], out.stdout.split("[")[1].split("]")[0]
    assert rc == "2" and heavy == "", out.stdout + out.stderr
    assert "algorithm.params.bogus: EvoGM takes no such argument" in out.stderr


def test_stop_string_is_one_stop_string():
    spec = TaskSpec(name="g", type="generation", path="x", stop="END")
    assert spec.stop == ("END",) and spec.to_dict()["stop"] == ["END"]
    assert TaskSpec(name="g", type="generation", path="x", stop=["\n", "END"]).stop == ("\n", "END")


def test_task_paths_are_absolute_in_config_and_run_json(tiny_setup, tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws", tiny_setup) if (tmp_path / "ws").mkdir() is None else None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = ws.start_run()
    run = json.loads((out / "run.json").read_text())
    for spec in run["config"]["tasks"]:
        assert Path(spec["path"]).is_absolute() and Path(spec["test_path"]).is_absolute()
        assert Path(spec["path"]).parent == tmp_path / "ws" / "data"
    assert all(Path(p).is_absolute() for p in run["task_hashes"])
    monkeypatch.chdir(tmp_path)  # the same config resumes from another folder
    prepare_output(load_config(ws.root / "search.yaml"), resume=True, overwrite=False, write=False)


def test_rerun_after_a_failed_start_proceeds(tiny_setup, tmp_path, monkeypatch):
    """run.json of a start that was killed (no checkpoint): a corrected plain rerun and --resume both start afresh."""
    ws = Workspace(tmp_path, tiny_setup)
    monkeypatch.chdir(tmp_path)
    for resume in (False, True):
        out = error_cases_runs.killed_start(ws)
        assert (out / "records.jsonl").exists()
        ws.line("copy", '{"prompt": "p", "answer": "x"}')  # the user fixes/changes the data
        config = load_config(ws.root / "search.yaml")
        run = prepare_output(config, resume=resume, overwrite=False)
        saved = json.loads((out / "run.json").read_text())
        assert saved["task_hashes"] == run["task_hashes"]
        assert not (out / "records.jsonl").exists()


def test_overwrite_deletes_only_the_run_files(tiny_setup, tmp_path, monkeypatch):
    from evox_merge.run.run_files import record_run_files, run_id_of

    ws = Workspace(tmp_path, tiny_setup)
    monkeypatch.chdir(tmp_path)
    out = ws.start_run()
    for name in ("records.jsonl", "recipe.json", "README.md"):
        (out / name).write_text("old")
    (out / "best" / "adapter").mkdir(parents=True)
    (out / "best" / "adapter" / "weights").write_text("old")
    record_run_files(out, run_id_of(out))  # as the search records what it wrote
    (out / "mine.txt").write_text("the user's")
    prepare_output(load_config(ws.root / "search.yaml"), resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["mine.txt", "run.json"]


# ---- Models by Hub id, offline, from a Hub cache written here ----

def cache_model(cache: Path, repo_id: str, folder: Path, commit: str) -> None:
    """Write `folder` into the Hub cache layout: models--org--name/{refs/main, snapshots/<commit>/}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_models_by_hub_id_offline(tiny_setup, tmp_path, monkeypatch):
    from evox_merge.run.search import run_search

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    base_commit, expert_commit = "a" * 40, "b" * 40
    cache_model(cache, "tiny-org/base", tiny_setup.base_dir, base_commit)
    cache_model(cache, "tiny-org/expert-zero", tiny_setup.adapter_dirs[0], expert_commit)
    ws = Workspace(tmp_path / "ws", tiny_setup) if (tmp_path / "ws").mkdir() is None else None
    monkeypatch.chdir(ws.root)
    config = load_config(ws.write_config(base=f"tiny-org/base@{base_commit}", tokenizer="tiny-org/base",
                                         experts=["tiny-org/expert-zero", "expert_1"]))
    assert config.base == f"tiny-org/base@{base_commit}" and config.experts[0] == "tiny-org/expert-zero"
    result = run_search(config, progress="quiet")
    recipe = result.recipe
    assert recipe["base_model"]["hub"] == {"repo_id": "tiny-org/base", "revision": base_commit,
                                           "commit": base_commit,
                                           "snapshot": str(cache / "models--tiny-org--base" / "snapshots" /
                                                           base_commit)}
    assert recipe["experts"][0]["name"] == "expert-zero"
    assert recipe["experts"][0]["hub"] == {"repo_id": "tiny-org/expert-zero", "revision": "main",
                                           "commit": expert_commit}
    assert recipe["tokenizer"]["tokenizer"]["commit"] == base_commit
    assert recipe["tokenizer"]["model_embedding_rows"] == recipe["tokenizer"]["base_vocabulary_size"]
    with pytest.raises(MergeInputError, match=r"base: tiny-org/base at revision 'v9' is neither a local directory"):
        load_config(ws.write_config(base="tiny-org/base@v9"))


def test_every_case_is_in_docs_errors_md():
    """docs/errors.md is generated from CASES and the messages they got (rewrite it with the env variable)."""
    if len(MESSAGES) != len(CASES):
        pytest.skip("run the whole file to compare docs/errors.md with the table")
    text = render_doc()
    if os.environ.get("EVOX_MERGE_WRITE_ERRORS_DOC"):
        DOC.write_text(text)
    assert DOC.read_text() == text, ("docs/errors.md is out of date: EVOX_MERGE_WRITE_ERRORS_DOC=1 python -m pytest "
                                     "-q tests/test_errors.py")


def render_doc() -> str:
    lines = [
        "# Errors: every bad input and the message it gets",
        "",
        "Generated by `tests/test_errors.py` (`EVOX_MERGE_WRITE_ERRORS_DOC=1 python -m pytest -q "
        "tests/test_errors.py`); the test fails when this file and the table disagree. Every error is a subclass "
        "of `evox_merge.util.errors.EvoxMergeError`: the CLI prints `evox-merge: error: <message>` and exits with "
        "status 2. \"Before the model\" means the input is refused before any model weights load (for a search "
        "config, before torch is even imported). `<dir>` is the folder the command ran in; a refused input "
        "changes no file.",
        "",
        "| case | bad input | error | before the model | message |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case in CASES:
        message = MESSAGES[case.id].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{case.id}` | {case.input} | `{case.error.__name__}` | "
                     f"{'yes' if case.before_model else 'no'} | {message} |")
    return "\n".join(lines) + "\n"
