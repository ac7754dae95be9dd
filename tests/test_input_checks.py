"""Inputs that were accepted silently: the warnings (test examples that are also validation examples) and what the
error table (tests/error_cases_inputs.py) cannot express: a warning's path to the log, the summary, recipe.json and
the model card; `evaluate`'s JSON without NaN; the legitimate inputs next to each refused one; examples with nothing
to score refused alike before the model (file:line) and by scorers built from Python (example index)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys

import pytest
import yaml
from transformers import AutoTokenizer, T5Config

from benchmarks.sweep.config import load_sweep_config

from error_cases_inputs import ZERO_WIDTH, dropping_tokenizer
from error_harness import Workspace
from evox_merge.cli import main
from evox_merge.experts.adapters import read_lora_adapter
from evox_merge.run.config import check_objectives
from evox_merge.run.report import model_card
from evox_merge.tasks.batching import check_lengths, position_limit
from evox_merge.tasks.scorers import build_scorer
from evox_merge.tasks.spec import TaskSpec, check_task_specs, read_task, split_overlap
from evox_merge.tasks.spec_sources import load_task_specs
from evox_merge.util.errors import MergeInputError, TaskFormatError
from evox_merge.util.yaml_file import read_yaml


def _share_validation_lines(ws: Workspace, name: str, count: int) -> None:
    """Append the first `count` validation examples of task `name` to its test file."""
    lines = (ws.root / "data" / f"{name}_validation.jsonl").read_text().splitlines()[:count]
    with open(ws.root / "data" / f"{name}_test.jsonl", "a") as handle:
        handle.writelines(line + "\n" for line in lines)


def test_test_examples_in_validation_are_a_warning_in_log_summary_recipe_and_card(tiny_setup, tmp_path, monkeypatch,
                                                                                  capsys, caplog):
    ws = Workspace(tmp_path, tiny_setup)
    monkeypatch.chdir(tmp_path)
    _share_validation_lines(ws, "copy", 2)
    with caplog.at_level(logging.WARNING):
        assert main(["search", str(ws.write_config()), "--quiet"]) == 0
    expected = "task 'copy': 2 of the 14 test examples of"
    assert any(expected in record.getMessage() for record in caplog.records)  # logged as the config loads
    assert f"Warning: {expected}" in capsys.readouterr().out  # and in the summary
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert len(recipe["warnings"]) == 1 and expected in recipe["warnings"][0]
    assert "copy_validation.jsonl, which chose the release" in recipe["warnings"][0]
    assert recipe["evaluation"]["test_overlap"] == {"copy": {"test_examples": 14, "also_in_validation": 2}}
    assert "never used" not in recipe["evaluation"]["splits"]["test"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "never used to choose anything" not in card
    assert "**not fully held out**" in card and "2 of 14 in `copy`" in card and f"**Warning:** {expected}" in card
    # The same run without the overlap says what it said before.
    clean = {**recipe, "warnings": [], "evaluation": {**recipe["evaluation"], "test_overlap": {}}}
    assert "`test` = never used to choose anything" in model_card(clean) and "Warning" not in model_card(clean)


def test_split_overlap_counts_by_what_the_model_reads(tmp_path):
    def write(name, records):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))

    write("v.jsonl", [{"q": "1+1", "answer": "2"}, {"q": "2+2", "answer": "4"}])
    write("t.jsonl", [{"q": "2+2", "answer": "5"}, {"q": "3+3", "answer": "6"}])  # same prompt, another answer
    spec = TaskSpec(name="g", type="generation", path=str(tmp_path / "v.jsonl"), test_path=str(tmp_path / "t.jsonl"),
                    prompt_template="Q: {q}")
    assert {k: v for k, v in split_overlap(spec).items() if k != "warning"} == {"test_examples": 2,
                                                                                "also_in_validation": 1}
    write("t.jsonl", [{"q": "3+3", "answer": "6"}])
    assert split_overlap(spec) is None
    write("t.jsonl", [{"q": "2+2", "answer": "4"}])
    with pytest.raises(TaskFormatError, match=r"every one of the 1 test examples .* \(same prompt\)"):
        split_overlap(spec)


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links")
def test_test_path_linked_to_path_is_the_same_file(tmp_path):
    (tmp_path / "v.jsonl").write_text('{"prompt": "p", "answer": "a"}\n')
    os.symlink(tmp_path / "v.jsonl", tmp_path / "t.jsonl")
    spec = TaskSpec(name="g", type="generation", path=str(tmp_path / "v.jsonl"), test_path=str(tmp_path / "t.jsonl"))
    with pytest.raises(TaskFormatError, match=r"task 'g': test_path .*t\.jsonl is the same file as path"):
        check_task_specs([spec])
    os.remove(tmp_path / "t.jsonl")
    shutil.copy(tmp_path / "v.jsonl", tmp_path / "t.jsonl")
    check_task_specs([spec])  # another file (its examples are compared by split_overlap)


def test_evaluate_prints_null_for_a_score_that_is_not_finite(tiny_setup, tmp_path, monkeypatch, capsys):
    import evox_merge.tasks.scorers as scoring

    ws = Workspace(tmp_path, tiny_setup)
    real = scoring.build_scorer

    def nan_for_copy(task, *args, **kwargs):
        scorer = real(task, *args, **kwargs)
        if task.name == "copy":
            monkeypatch.setattr(scorer, "score", lambda model: float("nan"))
        return scorer

    monkeypatch.setattr(scoring, "build_scorer", nan_for_copy)
    assert main(["evaluate", "--model", str(ws.root / "base"), "--tasks", str(ws.tasks_file())]) == 0

    def refuse(constant):
        raise AssertionError(f"evaluate printed {constant}, which is not JSON")

    scores = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert scores["copy"] is None and scores["mean"] is None
    assert isinstance(scores["choice"], float) and isinstance(scores["text"], float)


def test_yaml_merge_keys_may_override_but_repeated_keys_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 5\n")
    assert read_yaml(path, MergeInputError) == {"base": {"x": 1, "y": 2}, "other": {"x": 5, "y": 2}}
    path.write_text("a: 1\nnested:\n  - {name: x, name: y}\n")
    with pytest.raises(MergeInputError, match=r"c\.yaml:3: duplicate key 'name' \(first given at line 3\)"):
        read_yaml(path, MergeInputError)
    path.write_text('[{"name": "a", "type": "generation", "path": "a.jsonl", "type": "generation"}]')
    with pytest.raises(TaskFormatError, match=r"c\.yaml:1: duplicate key 'type'"):
        load_task_specs(path)


def test_sweep_configs_refuse_repeated_keys(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s"}) + "name: t\n")
    with pytest.raises(MergeInputError, match=r"sweep\.yaml:2: duplicate key 'name' \(first given at line 1\)"):
        load_sweep_config(path)


def test_templates_of_plain_fields_literal_braces_and_numbers_are_fine(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"question": "2+2", "n": 3, "answer": "4"}) + "\n")
    spec = TaskSpec(name="g", type="generation", path=str(path), prompt_template="{{Q{n}}} {question} =")
    assert read_task(spec).records[0]["prompt"] == "{Q3} 2+2 ="


def test_adapter_ranks_may_come_from_rank_pattern(tiny_setup, tmp_path):
    folder = shutil.copytree(tiny_setup.adapter_dirs[0], tmp_path / "expert")  # rank 4 on q_proj and v_proj
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 16,
                                                            "rank_pattern": {"q_proj": 4, "v_proj": 4}}))
    adapter = read_lora_adapter(folder)
    assert set(adapter.ranks.values()) == {4}
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 16, "rank_pattern": {"q_proj": 4}}))
    with pytest.raises(MergeInputError, match=r"v_proj\.lora_A\.weight' has shape \(4, 64\) \(rank 4\) but .* r = 16"):
        read_lora_adapter(folder)


QWEN2 = {"model_type": "qwen2", "max_position_embeddings": 256}
T5 = {"model_type": "t5", "is_encoder_decoder": True}
GOOD = {"language_modeling": {"text": "abc"}, "multiple_choice": {"prompt": "q", "choices": ["a", "b"], "answer": 0},
        "generation": {"prompt": "q", "answer": "a"}}


@pytest.mark.parametrize("config, kind, record, prefix, before, after", [
    (QWEN2, "language_modeling", {"text": "ab"}, "", None, None),
    (QWEN2, "language_modeling", {"text": "a"}, "", r"the text tokenises to 1 token; a language-modelling text needs "
     r"at least 2", r"example 1: tokenises to 1 tokens with 1 of context"),
    (QWEN2, "language_modeling", {"text": "a"}, "Q: ", None, None),  # the prefix is the context
    (QWEN2, "language_modeling", {"text": ZERO_WIDTH}, "Q: ", r"the text tokenises to nothing after the prefix",
     r"example 1: tokenises to 3 tokens with 3 of context"),
    (QWEN2, "multiple_choice", {"prompt": "q", "choices": ["a", ZERO_WIDTH], "answer": 0},
     "", r"choices\[1\] '\\u200b' tokenises to nothing", r"example 1, choices\[1\]: tokenises to 1 tokens with 1 of"),
    (QWEN2, "multiple_choice", {"prompt": ZERO_WIDTH, "choices": ["a", "b"], "answer": 0}, "",
     r"the prompt '\\u200b' tokenises to nothing", r"example 1, choices\[0\]: tokenises to 1 tokens with 0 of context"),
    (QWEN2, "generation", {"prompt": ZERO_WIDTH, "answer": "a"}, "", r"the prompt '\\u200b' tokenises to nothing",
     r"example 1: the prompt tokenises to nothing"),
    (T5, "language_modeling", {"text": "a"}, "", None, None),  # the decoder scores every token of a text
    (T5, "language_modeling", {"text": ZERO_WIDTH}, "", r"the text tokenises to nothing; expected at least one",
     r"example 1: the text tokenises to nothing"),
    (T5, "multiple_choice", {"prompt": "q", "choices": [ZERO_WIDTH, "b"], "answer": 1}, "",
     r"choices\[0\] '\\u200b' tokenises to nothing", r"example 1, choices\[0\]: tokenises to nothing"),
])
def test_nothing_to_score_is_refused_before_the_model_and_by_the_scorers(tmp_path, config, kind, record, prefix,
                                                                          before, after):
    """`check_lengths` (with the tokenizer, before the weights) names the file's line; the scorers, built directly
    from Python, refuse the same example by its index; an input next to a refused one is accepted by both."""
    tokenizer = AutoTokenizer.from_pretrained(dropping_tokenizer(tmp_path / "tokenizer"))
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(GOOD[kind]) + "\n" + json.dumps(record) + "\n")
    spec = TaskSpec(name="t", type=kind, path=str(path), prefix=prefix)
    model_config = T5Config(decoder_start_token_id=0) if config is T5 else None
    if before is None:
        check_lengths([spec], tokenizer, config, "model")
        build_scorer(read_task(spec), tokenizer, 4, "cpu", model_config=model_config)
        return
    with pytest.raises(TaskFormatError, match=rf"^task 't': {re.escape(str(path))}:2: {before}"):
        check_lengths([spec], tokenizer, config, "model")
    with pytest.raises(TaskFormatError, match=rf"^task 't', {after}"):
        build_scorer(read_task(spec), tokenizer, 4, "cpu", model_config=model_config)


def test_an_encoder_input_needs_a_prefix_or_an_end_of_sequence_token(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(dropping_tokenizer(tmp_path / "tokenizer"))
    tokenizer.eos_token = None
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"text": "abc"}) + "\n")
    with pytest.raises(TaskFormatError, match=r"^task 't': the encoder input \(the spec's prefix ''\) tokenises to "
                                              r"nothing and the tokenizer has no end-of-sequence token"):
        check_lengths([TaskSpec(name="t", type="language_modeling", path=str(path))], tokenizer, T5, "model")
    check_lengths([TaskSpec(name="t", type="language_modeling", path=str(path), prefix="Q:")], tokenizer, T5, "model")
    check_lengths([TaskSpec(name="t", type="language_modeling", path=str(path))], tokenizer, QWEN2, "model")


def test_position_limit_of_decoders_only():
    assert position_limit({"model_type": "qwen2", "max_position_embeddings": 256}) == (256, "max_position_embeddings")
    assert position_limit({"model_type": "gpt2", "n_positions": 1024}) == (1024, "n_positions")
    assert position_limit({"model_type": "t5", "is_encoder_decoder": True, "n_positions": 512,
                           "relative_attention_num_buckets": 32}) is None
    assert position_limit({"model_type": "mystery"}) is None


def test_objective_names_become_distinct_folders():
    assert check_objectives("pareto", ["arc easy", "arc-hard", "x+y"], "nsga2") == []
    (problem,) = check_objectives("pareto", ["Copy", "copy"], "nsga2")
    assert "objectives 'Copy' and 'copy' would both write specialists/copy/" in problem
    (problem,) = check_objectives("pareto", ["t" * 300, "b"], "nsga2")
    assert "is 300 bytes long as a folder name" in problem
