"""Multiple-choice scoring continues each prompt's KV cache; it must equal scoring every full sequence."""

import json
import math
import types

import pytest
import torch

from evox_merge.tasks.scoring import MultipleChoiceScorer
from evox_merge.tasks.scorers import build_scorer
from evox_merge.tasks import TaskSpec, read_task


def full_sequence_logprob(model, tokenizer, prompt: str, choice: str) -> float:
    """The reference: one unpadded forward pass of prompt + choice, summing the choice tokens' log-probabilities."""
    context = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    scored = tokenizer(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + scored])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(logprobs[len(context) - 1 + j, token].item() for j, token in enumerate(scored))


@pytest.fixture()
def ragged_task(tmp_path):
    """Prompts and choices of many lengths, and examples with 2, 3 or 4 choices."""
    words = ["ab", "hello", "xyzzy", "a", "merge", "evolution", "q", "tiny"]
    records = [
        {"prompt": f"pick {w}:", "choices": [w, w[::-1] + "!", w.upper() * 2, "z"][: 2 + i % 3], "answer": i % 2}
        for i, w in enumerate(words)
    ]
    path = tmp_path / "ragged.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_task(TaskSpec(name="ragged", type="multiple_choice", path=str(path)))


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_cached_prompt_scoring_equals_full_sequences(tiny_experts, ragged_task, batch_size):
    model, tokenizer = tiny_experts.model, tiny_experts.tokenizer
    scorer = MultipleChoiceScorer(ragged_task, tokenizer, batch_size, "cpu")
    assert_equals_full_sequences(model, tokenizer, ragged_task, scorer.choice_logprobs(model))


def assert_equals_full_sequences(model, tokenizer, task, logprobs: torch.Tensor) -> None:
    """Every real choice's log-probability within 1e-4 of `full_sequence_logprob`, -inf for missing choices."""
    for index, record in enumerate(task.records):
        choices = record["choices"]
        reference = [full_sequence_logprob(model, tokenizer, record["prompt"], c) for c in choices]
        torch.testing.assert_close(logprobs[index, : len(choices)], torch.tensor(reference, dtype=torch.float64),
                                   rtol=0, atol=1e-4)
        assert torch.all(logprobs[index, len(choices):] == -math.inf)


def test_accuracy_is_argmax_of_the_real_choices(tiny_experts, ragged_task):
    model, tokenizer = tiny_experts.model, tiny_experts.tokenizer
    scorer = MultipleChoiceScorer(ragged_task, tokenizer, 5, "cpu")
    hits = 0
    for record in ragged_task.records:
        scores = [full_sequence_logprob(model, tokenizer, record["prompt"], c) for c in record["choices"]]
        hits += max(range(len(scores)), key=scores.__getitem__) == record["answer"]
    assert scorer.score(model) == pytest.approx(hits / len(ragged_task.records))


def test_language_modelling_score_is_minus_the_mean_token_nll_of_unpadded_texts(tiny_experts, tmp_path):
    texts = ["a short line", "a somewhat longer line of text to score", "xy", "merge the experts, then score"]
    path = tmp_path / "lm.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    task = read_task(TaskSpec(name="lm", type="language_modeling", path=str(path)))
    model, tokenizer = tiny_experts.model, tiny_experts.tokenizer
    total, count = 0.0, 0
    for text in texts:  # reference: one unpadded forward pass per text, every token after the first scored
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        total += sum(logprobs[j - 1, ids[j]].item() for j in range(1, len(ids)))
        count += len(ids) - 1
    for batch_size in (1, 3):
        score = build_scorer(task, tokenizer, batch_size, "cpu").score(model)
        assert score == pytest.approx(total / count, abs=1e-5)
    assert score < 0


def test_stop_tokens_only_for_single_ascii_characters(tiny_experts):
    from evox_merge.tasks.generation import stop_token_ids

    tokenizer = tiny_experts.tokenizer
    assert stop_token_ids(tokenizer, ["\n"]).tolist() == [tokenizer.convert_tokens_to_ids("\n")]
    # a special token's text counts too: a completion holding "<pad>" holds an "a" once decoded
    assert stop_token_ids(tokenizer, [".", "a"]).tolist() == sorted(
        tokenizer.convert_tokens_to_ids(["a", ".", "<pad>"]))
    for stop in (["ab"], ["\n", "Q:"], [" "], ["é"]):  # these keep the string check
        assert stop_token_ids(tokenizer, stop) is None


@pytest.mark.parametrize("batch_size", [1, 4])
def test_stop_checks_on_token_ids_equal_string_checks_and_generate(tiny_experts, tmp_path, batch_size):
    """Stop characters chosen among what the random model does generate, so rows really stop mid-completion."""
    from evox_merge.tasks.generation import greedy_completions

    model, tokenizer = tiny_experts.model, tiny_experts.tokenizer
    prompts = [f"copy {w}=" for w in ["ab", "hello", "xyzzy", "a", "merge", "evolution"]]
    uncut = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        output = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0,
                                eos_token_id=tokenizer.eos_token_id)
        uncut.append(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True))
    inner = [c for text in uncut for c in text[1:-1] if c.isascii() and c != " "]
    stops = [max(set(inner), key=inner.count), inner[0]]
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in prompts))
    for stop in ([stops[0]], stops, [stops[0] + stops[1]]):
        task = read_task(TaskSpec(name="g", type="generation", path=str(path), max_new_tokens=10, stop=stop))
        scorer = build_scorer(task, tokenizer, batch_size, "cpu")
        assert (scorer.stop_ids is None) == (len(stop[0]) > 1)
        ours = scorer.completions(model)
        expected = []
        for text in uncut:
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
            expected.append(text[:cut])
        assert ours == expected
        assert sum(a != b for a, b in zip(ours, uncut)) >= 2  # the stops did cut
        by_strings = [text for batch in scorer.batches for text in greedy_completions(
            model, tokenizer, batch, 10, stop, stop_ids=None)[0]]
        order = [row for batch in scorer.batches for row in batch.rows.tolist()]
        assert [ours[row] for row in order] == by_strings


class ScriptedModel(torch.nn.Module):
    """Emits, for row r, the tokens of ``script[r]`` one per step (greedy picks them), whatever the input."""

    def __init__(self, script: list[list[int]], vocab: int) -> None:
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0,
                cache=None):
        logits = torch.zeros(len(self.script), 1, self.vocab)
        for row, tokens in enumerate(self.script):
            logits[row, 0, tokens[min(self.calls, len(tokens) - 1)]] = 1.0
        self.calls += 1
        return types.SimpleNamespace(logits=logits, cache=None)


def test_stop_tokens_eos_and_string_stops_cut_scripted_rows_alike(tiny_experts):
    """EOS (not part of the completion), a stop token, a two-character stop string spanning tokens, and a row
    that never stops: the token-id path and the string path give the same texts, and decoding ends early."""
    from evox_merge.tasks.batching import prompt_batches
    from evox_merge.tasks.generation import greedy_completions, stop_token_ids

    tokenizer = tiny_experts.tokenizer
    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in "abc\n"}
    eos = tokenizer.eos_token_id
    script = [[ids["a"], ids["b"], eos, ids["c"]], [ids["a"], ids["\n"], ids["c"], ids["c"]],
              [ids["b"], ids["b"], ids["c"], ids["a"]], [eos, ids["a"], ids["a"], ids["a"]]]
    (batch,) = prompt_batches([[ids["a"]]] * 4, 0, 4, "cpu")
    cases = {("\n",): ["ab", "a", "bbca", ""], ("\n", "c"): ["ab", "a", "bb", ""], ("bc",): ["ab", "a\ncc", "b", ""]}
    for stop, expected in cases.items():
        for stop_ids in (stop_token_ids(tokenizer, stop), None):
            model = ScriptedModel(script, len(tokenizer))
            assert greedy_completions(model, tokenizer, batch, 4, stop, stop_ids=stop_ids) == [expected]
        if stop == ("\n", "c"):
            assert model.calls == 3  # every row had stopped after the third token
