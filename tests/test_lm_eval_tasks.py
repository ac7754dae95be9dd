"""lm-evaluation-harness tasks as a task source (evox_merge.tasks.lm_eval_tasks): built offline from harness task
YAMLs over local JSON datasets the test writes, scored by our batched scorers, equal to lm_eval.simple_evaluate
(HF backend) on the same tiny model and documents."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from transformers import Qwen2ForCausalLM  # noqa: E402

from evox_merge.experts.merger import shared_merger  # noqa: E402
from evox_merge.tasks import read_task, task_spec_from_dict, task_specs_from_dict  # noqa: E402
from evox_merge.tasks.batching import check_lengths  # noqa: E402
from evox_merge.tasks.lm_eval_scoring import rolling_metrics  # noqa: E402
from evox_merge.tasks.scorers import build_scorer  # noqa: E402
from evox_merge.util.errors import TaskFormatError  # noqa: E402
from evox_merge.zoo.char_tokenizer import build_char_tokenizer  # noqa: E402
from tiny_models import tiny_config  # noqa: E402

DOCS = 40

MC_YAML = """task: evox_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}/mc_validation.json
    test: {data}/mc_test.json
validation_split: validation
test_split: test
fewshot_split: validation
output_type: multiple_choice
doc_to_text: "rev {{{{word}}}}:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
LM_YAML = """task: evox_lm
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}/lm_validation.json
    test: {data}/lm_test.json
validation_split: validation
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GEN_YAML = """task: evox_gen
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}/gen_validation.json
    test: {data}/gen_test.json
validation_split: validation
test_split: test
output_type: generate_until
doc_to_text: "copy {{{{word}}}}="
doc_to_target: "{{{{letter}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
filter_list:
  - name: first-letter
    filter:
      - function: regex
        regex_pattern: "([A-Z0-9])"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
GROUP_YAML = """group: evox_group
task:
  - evox_mc
  - evox_gen
"""
MISSING_YAML = """task: evox_missing
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/not_there.json
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{word}}}}"
doc_to_choice: choices
doc_to_target: label
"""


def _documents(rng: random.Random, count: int) -> dict[str, list[dict]]:
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6))) for _ in range(count)]
    return {
        "mc": [{"word": w, "choices": [w[::-1], w + "a", w.upper(), "h" * len(w)], "label": rng.randrange(4)}
               for w in words],
        "lm": [{"text": f"the word {w} backwards is {w[::-1]}."} for w in words],
        "gen": [{"word": w, "letter": rng.choice("A3JE")} for w in words],  # what the random models often write
    }


@pytest.fixture(scope="module")
def harness_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("harness")
    data, yamls = root / "data", root / "yaml"
    data.mkdir()
    yamls.mkdir()
    rng = random.Random(0)
    for split in ("validation", "test"):
        for name, docs in _documents(rng, DOCS).items():
            (data / f"{name}_{split}.json").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    for name, text in (("mc", MC_YAML), ("lm", LM_YAML), ("gen", GEN_YAML), ("missing", MISSING_YAML),
                       ("group", GROUP_YAML)):
        (yamls / f"{name}.yaml").write_text(text.format(data=data))
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOX_MERGE_LM_EVAL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(params=["base", "merge"])
def model(request, tokenizer):
    """A random base model, and a LoRA merge of the shared tiny experts (written into their model in place)."""
    if request.param == "base":
        torch.manual_seed(1)
        yield Qwen2ForCausalLM(tiny_config(len(tokenizer))).eval()
        return
    experts = request.getfixturevalue("tiny_experts")
    with shared_merger(experts).merged(torch.tensor([0.6, 0.3, -0.2, 0.5])):
        yield experts.model


def _spec(harness_dir: Path, name: str, **options):
    return task_spec_from_dict({"lm_eval": name, "include_path": str(harness_dir / "yaml"), **options})


def _simple_evaluate(model, tokenizer, harness_dir: Path, task: str, **kwargs):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(
        include_path=str(harness_dir / "yaml")), log_samples=True, **kwargs)
    return out["results"][task], out["samples"][task]


def test_spec_built_offline_with_splits_and_hash(harness_dir):
    spec = _spec(harness_dir, "evox_mc", limit=30, num_fewshot=2, metric="acc_norm")
    assert spec.type == "multiple_choice" and spec.metric == "accuracy_norm" and spec.name == "evox_mc"
    meta = spec.lm_eval
    assert meta["harness_version"] == lm_eval.__version__ and len(meta["config_sha256"]) == 64
    assert meta["splits"] == {"validation": "validation", "test": "test"} and meta["num_fewshot"] == 2
    validation, test = read_task(spec), read_task(spec.with_split("test"))
    assert len(validation.records) == len(test.records) == 30
    first = validation.records[0]
    assert first["prompt"].count("rev ") == 3 and first["prompt"].endswith(":")  # two shots, then the document
    assert all(choice.startswith(" ") for choice in first["choices"])  # the target delimiter
    assert task_spec_from_dict(spec.to_dict()) == spec  # a built spec reads back without rebuilding


def test_a_group_becomes_one_spec_per_task_sharing_its_weight(harness_dir):
    options = {"lm_eval": "evox_group", "include_path": str(harness_dir / "yaml"), "limit": 6, "weight": 2.0}
    specs = task_specs_from_dict(options)
    assert [spec.name for spec in specs] == ["evox_gen", "evox_mc"]
    assert [spec.weight for spec in specs] == [1.0, 1.0]
    assert {spec.lm_eval["group"] for spec in specs} == {"evox_group"}
    alone = task_spec_from_dict({"lm_eval": "evox_mc", "include_path": str(harness_dir / "yaml"), "limit": 6})
    assert read_task(specs[1]).records == read_task(alone).records  # a member is built as the task alone
    assert [s.name for s in task_specs_from_dict({"lm_eval": "evox_mc", "include_path": options["include_path"]})] \
        == ["evox_mc"]
    with pytest.raises(TaskFormatError, match="'name' names one task"):
        task_specs_from_dict({**options, "name": "mine"})
    with pytest.raises(TaskFormatError, match="is a group of"):
        task_spec_from_dict(options)


def test_handled_errors(harness_dir, tokenizer):
    with pytest.raises(TaskFormatError, match="no such harness task"):
        _spec(harness_dir, "evox_nope")
    with pytest.raises(TaskFormatError, match=r"lm_eval task 'evox_missing'.*datasets cache .*HF_DATASETS_OFFLINE"):
        _spec(harness_dir, "evox_missing")
    with pytest.raises(TaskFormatError, match=r"unknown field\(s\) \['limt'\]"):
        _spec(harness_dir, "evox_mc", limt=3)
    with pytest.raises(TaskFormatError, match="metric 'exact_match' cannot be scored here"):
        _spec(harness_dir, "evox_mc", metric="exact_match")
    with pytest.raises(TaskFormatError, match="filter 'strict' is not one of the task's filter pipelines"):
        _spec(harness_dir, "evox_gen", filter="strict")
    chat = _spec(harness_dir, "evox_mc", limit=4, chat_template=True)
    with pytest.raises(TaskFormatError, match="has no chat template"):
        check_lengths([chat], tokenizer, {"max_position_embeddings": 256}, "base")


def _ours(spec, tokenizer, model):
    task = read_task(spec.with_split("test"))
    return task, build_scorer(task, tokenizer, 8, "cpu")


@pytest.mark.slow
def test_multiple_choice_equals_simple_evaluate(harness_dir, tokenizer, model):
    results, samples = _simple_evaluate(model, tokenizer, harness_dir, "evox_mc", num_fewshot=2, limit=DOCS)
    for metric in ("acc", "acc_norm"):
        spec = _spec(harness_dir, "evox_mc", num_fewshot=2, limit=DOCS, metric=metric)
        task, scorer = _ours(spec, tokenizer, model)
        ours = scorer.score(model)
        assert abs(ours - results[f"{metric},none"]) <= 1 / DOCS + 1e-9, (metric, ours, results)
    by_doc = {sample["doc_id"]: sample for sample in samples}
    ours_ll = scorer.choice_logprobs(model)
    for record, row in zip(task.records, ours_ll):
        sample = by_doc[record["doc_id"]]
        assert [argument[0] for argument in sample["arguments"]][0].rstrip() == record["prompt"]
        theirs = torch.tensor([float(resp[0][0]) for resp in sample["resps"]], dtype=torch.float64)
        torch.testing.assert_close(row, theirs, atol=1e-3, rtol=1e-4)
    assert 0 < results["acc,none"] < 1  # a score that can move (random model, 4 choices)


@pytest.mark.slow
def test_rolling_perplexity_equals_simple_evaluate(harness_dir, tokenizer, model):
    results, _ = _simple_evaluate(model, tokenizer, harness_dir, "evox_lm", limit=DOCS)
    task, scorer = _ours(_spec(harness_dir, "evox_lm", limit=DOCS), tokenizer, model)
    sums, counts = scorer.row_logprobs(model)
    ours = rolling_metrics(task, sums[0].tolist())
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isclose(ours[metric], results[f"{metric},none"], rel_tol=1e-4), (metric, ours, results)
    # the first token is scored too (after BOS, as the harness's rolling windows do)
    assert int(counts.sum()) == sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"])
                                    for r in task.records)


@pytest.mark.slow
def test_generation_with_regex_filter_equals_simple_evaluate(harness_dir, tokenizer, model):
    results, samples = _simple_evaluate(model, tokenizer, harness_dir, "evox_gen", limit=DOCS)
    spec = _spec(harness_dir, "evox_gen", limit=DOCS)
    assert spec.stop == (".",) and spec.max_new_tokens == 6 and spec.lm_eval["filter"] == "first-letter"
    task, scorer = _ours(spec, tokenizer, model)
    assert abs(scorer.score(model) - results["exact_match,first-letter"]) <= 1 / DOCS + 1e-9
    theirs = {s["doc_id"]: s for s in samples if s["filter"] == "first-letter"}
    ours = scorer.completions(model)
    same = sum(text == theirs[record["doc_id"]]["resps"][0][0] for record, text in zip(task.records, ours))
    assert same >= DOCS - 1, (same, ours[:5], [theirs[i]["resps"][0][0] for i in range(5)])
    per_doc = scorer.values(model, 1)[0]  # the filter and metric per document, as the harness's samples say
    agree = sum(value == theirs[record["doc_id"]]["exact_match"] for record, value in zip(task.records, per_doc))
    assert agree >= DOCS - 1
    assert any(s["filtered_resps"][0] != "[invalid]" for s in theirs.values())  # the regex found something


TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}a:{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.mark.slow
def test_the_harness_conversation_equals_simple_evaluate_with_apply_chat_template(harness_dir, chat_tokenizer):
    torch.manual_seed(1)  # the random base model (the merge's equality is the plain tests' [merge] case)
    model = Qwen2ForCausalLM(tiny_config(len(chat_tokenizer))).eval()
    chat = {"apply_chat_template": True, "fewshot_as_multiturn": True, "system_instruction": "be brief"}
    options = {key: chat[key] for key in ("apply_chat_template", "fewshot_as_multiturn", "system_instruction")}
    results, samples = _simple_evaluate(model, chat_tokenizer, harness_dir, "evox_mc", num_fewshot=2, limit=DOCS,
                                        **options)
    spec = _spec(harness_dir, "evox_mc", num_fewshot=2, limit=DOCS, metric="acc_norm", **chat)
    assert spec.chat_template and spec.lm_eval["fewshot_as_multiturn"] and spec.lm_eval["apply_chat_template"]
    task, scorer = _ours(spec, chat_tokenizer, model)
    assert abs(scorer.score(model) - results["acc_norm,none"]) <= 1 / DOCS + 1e-9
    by_doc = {sample["doc_id"]: sample for sample in samples}
    for record, row in zip(task.records, scorer.choice_logprobs(model)):
        sample = by_doc[record["doc_id"]]
        context = sample["arguments"][0][0]
        assert context.startswith("s:be brief\n") and context.count("\na:") == 3  # two shots as turns, then ours
        theirs = torch.tensor([float(resp[0][0]) for resp in sample["resps"]], dtype=torch.float64)
        torch.testing.assert_close(row, theirs, atol=1e-3, rtol=1e-4)
    results, samples = _simple_evaluate(model, chat_tokenizer, harness_dir, "evox_gen", limit=DOCS, **options)
    task, scorer = _ours(_spec(harness_dir, "evox_gen", limit=DOCS, **chat), chat_tokenizer, model)
    theirs = {s["doc_id"]: s for s in samples if s["filter"] == "first-letter"}
    same = sum(text == theirs[r["doc_id"]]["resps"][0][0] for r, text in zip(task.records, scorer.completions(model)))
    assert same >= DOCS - 1
    assert abs(scorer.score(model) - results["exact_match,first-letter"]) <= 1 / DOCS + 1e-9


def test_harness_chat_options_are_checked(harness_dir):
    with pytest.raises(TaskFormatError, match="'fewshot_as_multiturn' needs 'apply_chat_template: true'"):
        _spec(harness_dir, "evox_mc", fewshot_as_multiturn=True)
    with pytest.raises(TaskFormatError, match="not both"):
        _spec(harness_dir, "evox_mc", apply_chat_template=True, chat_template=True)
    with pytest.raises(TaskFormatError, match="apply_chat_template applies to multiple_choice and generate_until"):
        _spec(harness_dir, "evox_lm", apply_chat_template=True)
    with pytest.raises(TaskFormatError, match="'apply_chat_template' must be true or false"):
        _spec(harness_dir, "evox_mc", apply_chat_template="yes")


@pytest.mark.slow
def test_search_with_harness_and_chat_tasks_records_them(harness_dir, tiny_setup, tmp_path):
    """A search whose tasks are two harness tasks and a chat-templated JSONL task (the tokenizer given by the
    config's ``tokenizer`` key carries the template): recipe.json records the harness version, each task's config
    hash and splits, and the template's hash."""
    from evox_merge.run.search import run_search
    from test_chat_template import TEMPLATE

    chat_tokenizer = build_char_tokenizer()
    chat_tokenizer.chat_template = TEMPLATE
    chat_tokenizer.save_pretrained(tmp_path / "chat_tokenizer")
    include = str(harness_dir / "yaml")
    tasks = [{**tiny_setup.tasks[0].to_dict(), "name": "choice_chat", "chat_template": {"system": "Be brief."}},
             {"lm_eval": "evox_mc", "include_path": include, "limit": 12, "num_fewshot": 1},
             {"lm_eval": "evox_gen", "include_path": include, "limit": 12}]
    config = {"base": str(tiny_setup.base_dir), "experts": [str(p) for p in tiny_setup.adapter_dirs],
              "tokenizer": str(tmp_path / "chat_tokenizer"), "tasks": tasks,
              "algorithm": {"name": "random", "pop_size": 4}, "budget": {"generations": 2}, "seed": 0,
              "batch_size": 8, "output_dir": str(tmp_path / "out"), "intended_use": "tests",
              "release": {"baselines": False}}
    result = run_search(config, progress="quiet")
    recipe = json.loads((result.output_dir / "recipe.json").read_text())
    files = {entry["name"]: entry for entry in recipe["evaluation"]["task_files"]}
    assert files["choice_chat"]["chat_template"] and files["choice_chat"]["system_prompt"] == "Be brief."
    assert files["choice_chat"]["chat_template_sha256"] == hashlib.sha256(TEMPLATE.encode()).hexdigest()
    for name in ("evox_mc", "evox_gen"):
        meta = files[name]["lm_eval"]
        assert meta["harness_version"] == lm_eval.__version__ and len(meta["config_sha256"]) == 64
        assert meta["splits"] == {"validation": "validation", "test": "test"} and "test_sha256" in files[name]
    for split in ("search", "selection", "test"):
        assert set(result.scores["release"][split]) >= {"choice_chat", "evox_mc", "evox_gen"}
