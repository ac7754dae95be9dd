"""Encoder-decoder models (T5 family) in MergeProblem (evox_merge/tasks/seq2seq.py): every task type against a
per-example reference, LoRA and dense T5 experts merged in place, and a search whose release re-scores."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from evox_merge.experts import ExpertSet
from evox_merge.experts.merger import shared_merger
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.tasks import read_task
from evox_merge.tasks.batching import encode
from evox_merge.tasks.scorers import build_scorer
from evox_merge.tasks.scoring import normalize_answer
from evox_merge.util.errors import MergeInputError
from tiny_models import build_tiny_t5_setup, write_dense_experts


@pytest.fixture(scope="module")
def t5_setup(tmp_path_factory):
    return build_tiny_t5_setup(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def t5_model(t5_setup):
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_setup.base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(t5_setup.base_dir)
    with torch.no_grad():  # a random T5 is nearly uniform; sharpen it so choices and completions differ
        model.lm_head.weight.mul_(20)
        # ... and keep special tokens and the stop character out of greedy completions (so they are not empty).
        model.lm_head.weight[[*range(4), tokenizer.convert_tokens_to_ids("\n")]] = 0.0  # logit 0 < the best
    return model, tokenizer


def reference_logprob(model, source, target):
    """Summed log-probability of `target` given `source`, one example at a time through the model's own labels."""
    labels = torch.tensor([target])
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([source]), labels=labels).loss
    return -loss.item() * len(target)


def test_multiple_choice_and_lm_match_a_per_example_reference(t5_setup, t5_model):
    model, tokenizer = t5_model
    choice = read_task(t5_setup.tasks[0])
    scorer = build_scorer(choice, tokenizer, batch_size=5, device="cpu", model_config=model.config)
    logprobs = scorer.choice_logprobs(model)
    for index, record in enumerate(choice.records):
        source = encode(tokenizer, record["prompt"], special=True)
        for c, text in enumerate(record["choices"]):
            expected = reference_logprob(model, source, encode(tokenizer, text, special=False))
            assert logprobs[index, c].item() == pytest.approx(expected, rel=1e-6, abs=1e-4)
    accuracy = (logprobs.argmax(-1) == torch.tensor([r["answer"] for r in choice.records])).double().mean()
    assert scorer.score(model) == pytest.approx(float(accuracy))
    text = read_task(t5_setup.tasks[2])
    scorer = build_scorer(text, tokenizer, batch_size=4, device="cpu", model_config=model.config)
    source = encode(tokenizer, "", special=True) or [tokenizer.eos_token_id]
    total = tokens = 0
    for record in text.records:
        ids = encode(tokenizer, record["text"], special=False)
        total += reference_logprob(model, source, ids)
        tokens += len(ids)
    assert scorer.score(model) == pytest.approx(total / tokens, abs=1e-5)


def test_generation_matches_one_example_at_a_time(t5_setup, t5_model):
    model, tokenizer = t5_model
    copy = read_task(t5_setup.tasks[1])
    batched = build_scorer(copy, tokenizer, batch_size=8, device="cpu", model_config=model.config)
    single = build_scorer(copy, tokenizer, batch_size=1, device="cpu", model_config=model.config)
    texts = batched.completions(model)
    assert texts == single.completions(model) and any(texts)
    expected = sum(normalize_answer(t) == normalize_answer(r["answer"]) for t, r in zip(texts, copy.records))
    assert batched.score(model) == pytest.approx(expected / len(texts))


def test_lora_and_dense_t5_experts_merge_in_place(t5_setup, tmp_path):
    dense = write_dense_experts(t5_setup.base_dir, tmp_path / "dense", count=2)
    experts = ExpertSet.load(t5_setup.base_dir, [*t5_setup.adapter_dirs, *dense], dense_mode="stream")
    assert experts.model.config.is_encoder_decoder and experts.layers and experts.dense
    problem = MergeProblem(experts, t5_setup.tasks, batch_size=8)
    pop = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.6, -0.4, 0.5, 0.3]])
    scores = problem.evaluate_per_task(pop)
    assert torch.isfinite(scores).all() and not torch.equal(scores[0], scores[1])
    # The merged model scored from scratch (a fresh scorer on the merged weights) gives the same scores.
    with shared_merger(experts).merged(pop[1]):
        fresh = [build_scorer(read_task(spec), experts.tokenizer, 3, "cpu", model_config=experts.model.config)
                 .score(experts.model) for spec in t5_setup.tasks]
    assert fresh == pytest.approx(scores[1].tolist(), abs=1e-6)
    with pytest.raises(MergeInputError, match="candidates_per_pass > 1 is decoder-only"):
        MergeProblem(experts, t5_setup.tasks, batch_size=8, candidates_per_pass=2)


def test_a_t5_search_releases_an_adapter_that_reproduces_its_scores(t5_setup, tmp_path):
    from evox_merge.run.evaluate import evaluate_model
    from evox_merge.run.search import run_search

    config = {"base": str(t5_setup.base_dir), "experts": [str(p) for p in t5_setup.adapter_dirs],
              "tasks": [spec.to_dict() for spec in t5_setup.tasks], "algorithm": {"name": "cmaes", "pop_size": 4},
              "budget": {"generations": 2}, "seed": 0, "batch_size": 8, "output_dir": str(tmp_path / "run")}
    result = run_search(config, progress="quiet")
    spec_file = tmp_path / "tasks.yaml"
    spec_file.write_text(yaml.safe_dump([spec.to_dict() for spec in t5_setup.tasks]))
    scores = evaluate_model(t5_setup.base_dir, spec_file, adapter=result.output_dir / "best" / "adapter",
                            split="test")
    for spec in t5_setup.tasks:
        assert scores[spec.name] == pytest.approx(result.scores["release"]["test"][spec.name], abs=1e-5)
    assert json.loads((result.output_dir / "recipe.json").read_text())["release_files"]["adapter"] == "best/adapter"
    card = (result.output_dir / "README.md").read_text()
    assert "2 LoRA experts" in card and "base = AutoModelForSeq2SeqLM.from_pretrained(" in card


@pytest.mark.parametrize("kind", ["choice", "copy"])
def test_a_prompt_that_tokenises_to_nothing_is_refused_by_the_encoder_scorers(t5_setup, t5_model, kind):
    from evox_merge.tasks import Task
    from evox_merge.util.errors import TaskFormatError

    model, tokenizer = t5_model
    task = read_task(next(spec for spec in t5_setup.tasks if spec.name == kind))
    records = [dict(record) for record in task.records]
    records[2]["prompt"] = ""
    with pytest.raises(TaskFormatError, match=rf"task '{kind}', example 2: the prompt tokenises to nothing"):
        build_scorer(Task(task.spec, records), tokenizer, batch_size=4, device="cpu", model_config=model.config)
    build_scorer(Task(task.spec, records[:2] + records[3:]), tokenizer, batch_size=4, device="cpu",
                 model_config=model.config)  # the others score
