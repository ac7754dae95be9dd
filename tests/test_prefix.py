"""Shared prefixes: a task whose rows start with the same tokens runs them once and continues every row from their
KV cache; every score must equal the plain path and an unbatched full-sequence reference."""

import json

import pytest
import torch

from evox_merge.tasks import TaskSpec, read_task
from evox_merge.tasks.prefix import SharedPrefix, common_prefix_length
from evox_merge.tasks.scorers import build_scorer
from evox_merge.util.errors import TaskFormatError
from test_scoring import assert_equals_full_sequences

FEWSHOT = "rev ab: ba\nrev abc: cba\nrev hello: olleh\n"
WORDS = ["ab", "hello", "xyzzy", "a", "merge", "evolution", "q", "tiny", "pick", "zz"]


def write_task(tmp_path, name, kind, records, **fields):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_task(TaskSpec(name=name, type=kind, path=str(path), **fields))


@pytest.fixture()
def fewshot_choice(tmp_path):
    """Ragged prompts and 2 to 4 choices after a few-shot prefix from the spec."""
    records = [{"prompt": f"rev {w}:", "choices": [w[::-1], w + "!", w.upper() * 2, "z"][: 2 + i % 3], "answer": 0}
               for i, w in enumerate(WORDS)]
    return write_task(tmp_path, "mc", "multiple_choice", records, prefix=FEWSHOT)


def test_common_prefix_is_token_level_and_leaves_every_row_its_own_tokens():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # keep=1: the shorter row keeps one token
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]], keep=0) == 3
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]], keep=2) == 2
    assert common_prefix_length([[7, 2], [8, 2]]) == 0
    assert common_prefix_length([[5, 6, 7]]) == 2
    assert SharedPrefix.of([[1, 2, 3, 4], [1, 2, 3, 5]], 4, "cpu") is None  # shorter than the minimum
    assert SharedPrefix.of([[1, 2, 3, 4], [1, 2, 3, 5]], None, "cpu") is None
    assert SharedPrefix.of([[1, 2, 3, 4], [1, 2, 3, 5]], 2, "cpu").ids.tolist() == [[1, 2, 3]]
    # language modelling: the prefix's last position predicts a token every row shares
    assert SharedPrefix.of([[1, 2, 3, 4, 9], [1, 2, 3, 5, 9]], 1, "cpu", keep=2, shared_next=True).length == 2


def test_spec_prefix_is_put_before_every_prompt_and_validated(tmp_path, fewshot_choice):
    assert fewshot_choice.records[0]["prompt"] == FEWSHOT + "rev ab:"
    with pytest.raises(TaskFormatError, match="field 'prefix' must be a string"):
        TaskSpec(name="x", type="generation", path="x", prefix=3)
    assert "prefix" not in TaskSpec(name="x", type="generation", path="x").to_dict()
    assert TaskSpec(name="x", type="generation", path="x", prefix="Q").to_dict()["prefix"] == "Q"


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_multiple_choice_with_shared_prefix_equals_full_sequences(tiny_experts, fewshot_choice, batch_size):
    model, tokenizer = tiny_experts.model, tiny_experts.tokenizer
    shared = build_scorer(fewshot_choice, tokenizer, batch_size, "cpu", min_shared_prefix=1)
    plain = build_scorer(fewshot_choice, tokenizer, batch_size, "cpu", min_shared_prefix=None)
    assert shared.prefix.length == len(tokenizer(FEWSHOT + "rev ")["input_ids"]) and plain.prefix is None
    ours = shared.choice_logprobs(model)
    assert_equals_full_sequences(model, tokenizer, fewshot_choice, ours)
    torch.testing.assert_close(ours, plain.choice_logprobs(model), rtol=0, atol=1e-4)
    assert shared.score(model) == plain.score(model)


def reference_text_logprob(model, tokenizer, context: str, text: str) -> tuple[float, int]:
    """One unpadded pass: the summed log-probability of `text`'s tokens after `context` (after the first token
    where there is no context) and how many tokens that is."""
    before = tokenizer(context, add_special_tokens=True)["input_ids"] if context else []
    ids = before + tokenizer(text, add_special_tokens=not context)["input_ids"]
    start = max(len(before), 1)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(logprobs[j - 1, ids[j]].item() for j in range(start, len(ids))), len(ids) - start


@pytest.mark.parametrize("prefix", [FEWSHOT, ""])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_language_modelling_with_shared_prefix_equals_unbatched_texts(tiny_experts, tmp_path, prefix, batch_size):
    """With the spec's prefix (context, not scored) and without (the texts' own shared opening, scored)."""
    model, tokenizer = tiny_experts.model, tiny_experts.tokenizer
    texts = [f"the word {w} backwards is {w[::-1]}." for w in WORDS[:6]]
    task = write_task(tmp_path, "lm", "language_modeling", [{"text": t} for t in texts], prefix=prefix)
    shared = build_scorer(task, tokenizer, batch_size, "cpu", min_shared_prefix=1)
    plain = build_scorer(task, tokenizer, batch_size, "cpu", min_shared_prefix=None)
    assert shared.prefix.length == len(tokenizer(prefix + "the word ")["input_ids"]) - 1
    sums, counts = shared.row_logprobs(model)
    reference = [reference_text_logprob(model, tokenizer, prefix, text) for text in texts]
    torch.testing.assert_close(sums[0], torch.tensor([r[0] for r in reference], dtype=torch.float64),
                               rtol=0, atol=1e-4)
    assert counts.tolist() == [float(r[1]) for r in reference]
    plain_sums, plain_counts = plain.row_logprobs(model)
    torch.testing.assert_close(sums, plain_sums, rtol=0, atol=1e-4)
    assert torch.equal(counts, plain_counts)
    assert shared.score(model) == pytest.approx(plain.score(model), abs=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_generation_with_shared_prefix_equals_plain_decoding_and_generate(tiny_experts, tmp_path, batch_size):
    model, tokenizer = tiny_experts.model, tiny_experts.tokenizer
    records = [{"prompt": f"rev {w}:", "answer": w[::-1]} for w in WORDS]
    task = write_task(tmp_path, "gen", "generation", records, prefix=FEWSHOT, max_new_tokens=6, stop=["\n"])
    shared = build_scorer(task, tokenizer, batch_size, "cpu", min_shared_prefix=1)
    plain = build_scorer(task, tokenizer, batch_size, "cpu", min_shared_prefix=None)
    assert shared.prefix is not None
    ours = shared.completions(model)
    assert ours == plain.completions(model)
    for record, text in list(zip(task.records, ours))[:3]:
        ids = tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
        output = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                eos_token_id=tokenizer.eos_token_id)
        assert text == tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]


def test_short_shared_openings_keep_the_plain_path(tiny_setup, tiny_experts):
    """The default minimum leaves the fixture's own tasks (a few shared tokens) on the plain path."""
    for spec in tiny_setup.tasks:
        assert build_scorer(read_task(spec), tiny_experts.tokenizer, 4, "cpu").prefix is None


def test_packed_choice_batches_split_for_out_of_memory_retries_score_the_same(tiny_experts, fewshot_choice):
    from evox_merge.tasks.batching import PackedChoiceBatch, split_batch

    model, tokenizer = tiny_experts.model, tiny_experts.tokenizer
    scorer = build_scorer(fewshot_choice, tokenizer, 12, "cpu", min_shared_prefix=1)
    assert all(isinstance(batch, PackedChoiceBatch) for batch in scorer.batches)
    whole = scorer.choice_logprobs(model)
    scorer.batches = [half for batch in scorer.batches
                      for half in (split_batch(batch) if batch.rows.numel() > 1 else [batch])]
    assert len(scorer.batches) > len(whole) // 3
    torch.testing.assert_close(scorer.choice_logprobs(model), whole, rtol=0, atol=1e-5)
