"""Token log-probabilities from hidden states chunk by chunk (`evox_merge.tasks.logprobs`) equal the full-logits
path on every task type and path: plain, shared prefix, several candidates per pass, encoder-decoder; an output
layer the check does not recognise falls back to the full logits."""

import logging

import pytest
import torch
from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, CohereConfig, CohereForCausalLM, Gemma2Config,
                          Gemma2ForCausalLM)

import evox_merge.tasks.logprobs as logprobs_module
from evox_merge.experts.rows import candidate_rows
from evox_merge.tasks import TaskSpec, read_task
from evox_merge.tasks.logprobs import OutputHead, TokenLogprobs
from evox_merge.tasks.scorers import build_scorer
from test_batched_candidates import PREFIX
from tiny_models import build_tiny_t5_setup


@pytest.fixture()
def small_chunks(monkeypatch):
    """Chunks far smaller than a batch's logits, so every path crosses position and vocabulary chunk borders."""
    monkeypatch.setattr(logprobs_module, "VOCAB_CHUNK", 16)
    monkeypatch.setattr(logprobs_module, "CHUNK_ELEMENTS", 16 * 7)


def full_logits(monkeypatch):
    """Score through the model's whole logits (the path before chunking) from here on."""
    monkeypatch.setattr(logprobs_module, "_checked_head", lambda model, copies: None)


def per_example(scorer, model, copies=None):
    if hasattr(scorer, "choice_logprobs"):
        return scorer.choice_logprobs(model, copies) if copies else scorer.choice_logprobs(model)
    sums, _ = scorer.row_logprobs(model, copies or 1)
    return sums


@pytest.mark.parametrize("prefix", [None, PREFIX])
@pytest.mark.parametrize("copies", [None, 3])
def test_chunked_equals_full_logits_on_every_path(tiny_setup, tiny_experts, small_chunks, monkeypatch, prefix,
                                                  copies):
    model = tiny_experts.model
    assert TokenLogprobs(model).head is not None  # the tiny Qwen2's head is recognised: the chunked path runs
    specs = [spec for spec in tiny_setup.tasks if spec.type != "generation"]
    if prefix is not None:
        specs = [TaskSpec(**{**spec.__dict__, "prefix": prefix}) for spec in specs]
    scorers = [build_scorer(read_task(spec), tiny_experts.tokenizer, 5, "cpu", 1 if prefix else None)
               for spec in specs]
    population = torch.randn(copies or 1, tiny_experts.num_experts, generator=torch.Generator().manual_seed(3))

    def run():
        if copies is None:
            return [per_example(scorer, model) for scorer in scorers]
        with candidate_rows(tiny_experts, population):
            return [per_example(scorer, model, copies) for scorer in scorers]

    chunked = run()
    full_logits(monkeypatch)
    for ours, reference in zip(chunked, run()):
        finite = torch.isfinite(reference)
        assert torch.equal(finite, torch.isfinite(ours))
        torch.testing.assert_close(ours[finite], reference[finite], rtol=1e-5, atol=1e-5)


def test_encoder_decoder_chunked_equals_full_logits(small_chunks, monkeypatch, tmp_path):
    import evox_merge.tasks.seq2seq as seq2seq

    setup = build_tiny_t5_setup(tmp_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(setup.base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(setup.base_dir)
    assert logprobs_module.checked_seq2seq_head(model) is not None  # T5's scaled, tied head is recognised
    scorers = [build_scorer(read_task(spec), tokenizer, 4, "cpu", model_config=model.config)
               for spec in setup.tasks if spec.type != "generation"]
    assert scorers
    chunked = [scorer.example_parts(model)[0] for scorer in scorers]
    monkeypatch.setattr(seq2seq, "checked_seq2seq_head", lambda model: None)  # the full logits
    for ours, scorer in zip(chunked, scorers):
        torch.testing.assert_close(ours, scorer.example_parts(model)[0], rtol=1e-5, atol=1e-5)


def _tokens(vocabulary: int) -> torch.Tensor:
    return torch.randint(0, vocabulary, (3, 9), generator=torch.Generator().manual_seed(0))


def test_a_soft_capped_head_is_applied_as_the_model_applies_it(small_chunks):
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits well beyond the cap, so the cap matters
    tokens = TokenLogprobs(model)
    assert tokens.head is not None and tokens.head.softcap == 3.0
    ids = _tokens(101)
    with torch.no_grad():
        states, _ = tokens.states(input_ids=ids[:, :-1])
        reference = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)
    expected = reference.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(tokens.logprobs(states, ids[:, 1:]), expected, rtol=1e-5, atol=1e-5)


def test_an_unknown_output_transform_falls_back_to_full_logits(caplog):
    torch.manual_seed(0)
    config = CohereConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, logit_scale=0.25)
    model = CohereForCausalLM(config).eval()
    assert OutputHead.of(model) is not None  # a plain Linear: only the check can tell its logits are scaled
    with caplog.at_level(logging.WARNING, logger="evox_merge.tasks.logprobs"):
        tokens = TokenLogprobs(model)
    assert tokens.head is None and "scoring holds full-vocabulary logits" in caplog.text
    ids = _tokens(97)
    with torch.no_grad():
        states, _ = tokens.states(input_ids=ids[:, :-1])
        expected = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)
    torch.testing.assert_close(tokens.logprobs(states, ids[:, 1:]),
                               expected.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1))
