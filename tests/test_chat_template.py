"""Chat templates on task prompts (evox_merge.tasks.chat): applied exactly as the tokenizer's apply_chat_template,
refused before the model loads where the tokenizer has none, recorded by hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from evox_merge.experts import ExpertSet
from evox_merge.tasks import Task, TaskSpec, read_task, task_spec_from_dict
from evox_merge.tasks.batching import check_lengths, scored_sequences
from evox_merge.tasks.chat import chat_facts, chat_messages, prompt_ids, read_chat_template
from evox_merge.tasks.scoring import GenerationScorer, LanguageModelScorer, MultipleChoiceScorer
from evox_merge.util.errors import TaskFormatError
from evox_merge.zoo.char_tokenizer import build_char_tokenizer
from tiny_models import tiny_config

# A ChatML-like template over the character vocabulary; it writes BOS itself (a special token in the text).
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def model(chat_tokenizer):
    torch.manual_seed(3)
    return Qwen2ForCausalLM(tiny_config(len(chat_tokenizer))).eval()


def _reference_ids(tokenizer, user: str, system: str = "") -> list[int]:
    """What the tokenizer's own apply_chat_template gives, tokenised by it."""
    out = tokenizer.apply_chat_template(chat_messages(user, system), tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


CHOICE = [{"prompt": f"rev {w}:", "choices": [w[::-1], w, w.upper()], "answer": 0} for w in ("abc", "dfe", "hgab")]


def test_spec_option_forms(tmp_path):
    path = _write(tmp_path / "c.jsonl", CHOICE)
    spec = task_spec_from_dict({"name": "c", "type": "multiple_choice", "path": path,
                                "chat_template": {"system": "Answer briefly."}})
    assert spec.chat_template and spec.system_prompt == "Answer briefly."
    assert task_spec_from_dict(spec.to_dict()) == spec  # reads back
    plain = task_spec_from_dict({"name": "c", "type": "multiple_choice", "path": path})
    assert "chat_template" not in plain.to_dict() and "system_prompt" not in plain.to_dict()
    with pytest.raises(TaskFormatError, match="system prompt needs the chat template"):
        TaskSpec("c", "multiple_choice", path, system_prompt="x")
    with pytest.raises(TaskFormatError, match=r"unknown key\(s\) \['sytem'\]"):
        task_spec_from_dict({"name": "c", "type": "multiple_choice", "path": path, "chat_template": {"sytem": "x"}})
    with pytest.raises(TaskFormatError, match="'chat_template' must be true, false"):
        task_spec_from_dict({"name": "c", "type": "multiple_choice", "path": path, "chat_template": "yes"})


@pytest.mark.parametrize("system", ["", "You are terse."])
def test_prompts_are_templated_exactly_as_apply_chat_template(tmp_path, chat_tokenizer, system):
    spec = TaskSpec("c", "multiple_choice", _write(tmp_path / "c.jsonl", CHOICE), chat_template=True,
                    system_prompt=system, prefix="Q: ")
    task = read_task(spec)
    expected = [_reference_ids(chat_tokenizer, record["prompt"], system) for record in task.records]
    assert expected[0][0] == chat_tokenizer.bos_token_id and expected[0].count(chat_tokenizer.bos_token_id) == 1
    assert prompt_ids(spec, chat_tokenizer, task.records) == expected
    rows = scored_sequences(task, chat_tokenizer)  # one per choice: the templated prompt, then the choice
    contexts = [ids[:context] for ids, context in rows]
    assert contexts == [ids for ids in expected for _ in range(3)]
    assert task.records[0]["prompt"].startswith("Q: rev")  # the prefix is inside the user message


def test_language_modelling_context_is_the_templated_prefix(tmp_path, chat_tokenizer):
    spec = TaskSpec("t", "language_modeling", _write(tmp_path / "t.jsonl", [{"text": "cba."}, {"text": "fed."}]),
                    prefix="reverse abc", chat_template=True, system_prompt="sys")
    rows = scored_sequences(read_task(spec), chat_tokenizer)
    context = _reference_ids(chat_tokenizer, "reverse abc", "sys")
    for (ids, scored_after), text in zip(rows, ("cba.", "fed.")):
        assert scored_after == len(context) and ids == context + chat_tokenizer(text, add_special_tokens=False)[
            "input_ids"]


def test_scores_are_those_of_the_templated_prompts(tmp_path, chat_tokenizer, model):
    """A chat task scores as a plain task whose prompts are the templated text (the character tokenizer adds no
    special tokens, so the ids are the same), and differently from the raw prompts."""
    path = _write(tmp_path / "c.jsonl", CHOICE)
    chat = read_task(TaskSpec("c", "multiple_choice", path, chat_template=True, system_prompt="s"))
    templated = [{**r, "prompt": chat_tokenizer.apply_chat_template(chat_messages(r["prompt"], "s"), tokenize=False,
                                                                     add_generation_prompt=True)}
                 for r in chat.records]
    plain = Task(TaskSpec("c", "multiple_choice", path), templated)
    raw = read_task(TaskSpec("c", "multiple_choice", path))
    scored = [MultipleChoiceScorer(t, chat_tokenizer, 2, "cpu").choice_logprobs(model) for t in (chat, plain, raw)]
    torch.testing.assert_close(scored[0], scored[1])
    assert not torch.allclose(scored[0], scored[2])
    gen_path = _write(tmp_path / "g.jsonl", [{"prompt": "copy ab=", "answer": "ab"}, {"prompt": "copy c=",
                                                                                       "answer": "c"}])
    gen = read_task(TaskSpec("g", "generation", gen_path, chat_template=True, max_new_tokens=4))
    scorer = GenerationScorer(gen, chat_tokenizer, 2, "cpu")
    batch_prompts = [row[mask.bool()].tolist() for batch in scorer.batches
                     for row, mask in zip(batch.input_ids, batch.attention_mask)]
    assert sorted(batch_prompts) == sorted(_reference_ids(chat_tokenizer, r["prompt"]) for r in gen.records)
    lm = read_task(TaskSpec("t", "language_modeling", _write(tmp_path / "t.jsonl", [{"text": "cba."}]),
                            prefix="p", chat_template=True))
    assert LanguageModelScorer(lm, chat_tokenizer, 2, "cpu").score(model) < 0


def test_template_read_from_the_files_and_hashed(tmp_path, chat_tokenizer):
    chat_tokenizer.save_pretrained(tmp_path / "tok")
    assert read_chat_template(tmp_path / "tok") == TEMPLATE
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").chat_template == TEMPLATE
    build_char_tokenizer().save_pretrained(tmp_path / "plain")
    assert read_chat_template(tmp_path / "plain") is None
    spec = TaskSpec("c", "multiple_choice", _write(tmp_path / "c.jsonl", CHOICE), chat_template=True)
    assert chat_facts(spec, chat_tokenizer) == {"chat_template_sha256": hashlib.sha256(TEMPLATE.encode()).hexdigest()}
    assert chat_facts(replace(spec, chat_template=False), chat_tokenizer) == {}


def test_no_template_is_refused_before_the_model_loads(tmp_path, tiny_setup, monkeypatch):
    spec = replace(tiny_setup.tasks[0], chat_template=True)
    with pytest.raises(TaskFormatError, match="task 'choice': chat_template is set but the tokenizer of .* has no "
                                              "chat template"):
        check_lengths([spec], build_char_tokenizer(), {"max_position_embeddings": 256}, "base")
    import evox_merge.experts.expert_set as expert_set

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(expert_set, "_load_base_model", must_not_load)
    with pytest.raises(TaskFormatError, match="has no chat template"):
        ExpertSet.load(tiny_setup.base_dir, tiny_setup.adapter_dirs, task_specs=[spec])
