"""Batches sized by tokens (``batch_tokens``): every batch holds at most that many padded tokens, as many rows as
fit, every row once; the scores equal those of batches sized by rows."""

import pytest
import torch

from evox_merge.tasks import TaskSpec, read_task
from evox_merge.tasks.batching import ChoiceBatch, PackedChoiceBatch, PromptBatch, TargetBatch, cut_sorted
from evox_merge.tasks.scorers import build_scorer


def padded_tokens(batch, new_tokens: int = 0) -> int:
    """The tokens a batch puts through the model, padding included (a prompt batch also the tokens it decodes)."""
    if isinstance(batch, TargetBatch):
        return batch.input_ids.numel()
    if isinstance(batch, PromptBatch):
        return batch.input_ids.shape[0] * (batch.input_ids.shape[1] + new_tokens)
    if isinstance(batch, ChoiceBatch):
        return batch.prompt_ids.numel() + batch.choice_ids.numel()
    assert isinstance(batch, PackedChoiceBatch)
    return batch.input_ids.numel()


@pytest.fixture()
def fewshot_tasks(tmp_path, tiny_setup):
    """The fixture's three tasks, and the same with a few-shot prefix (the shared-prefix paths)."""
    tasks = [read_task(spec) for spec in tiny_setup.tasks]
    for spec in tiny_setup.tasks:
        tasks.append(read_task(TaskSpec(**{**spec.__dict__, "name": spec.name + "_fewshot",
                                           "prefix": "rev ab: ba\nrev abc: cba\ncopy ab= ab\n"})))
    return tasks


def outputs(scorer, model):
    """What a scorer computes per example: completions, each choice's log-probability, each text's sum."""
    if scorer.task.spec.type == "generation":
        return scorer.completions(model)
    if scorer.task.spec.type == "multiple_choice":
        return scorer.choice_logprobs(model)
    return scorer.row_logprobs(model)[0]


@pytest.mark.parametrize("cap", [1, 60, 200])
def test_token_batches_respect_the_cap_and_score_the_same(tiny_experts, fewshot_tasks, cap):
    model, tokenizer = tiny_experts.model, tiny_experts.tokenizer
    for task in fewshot_tasks:
        by_rows = build_scorer(task, tokenizer, 4, "cpu", min_shared_prefix=8)
        by_tokens = build_scorer(task, tokenizer, 4, "cpu", min_shared_prefix=8, batch_tokens=cap)
        assert (by_tokens.prefix is None) == (by_rows.prefix is None) == (task.spec.prefix == "")
        new = task.spec.max_new_tokens if task.spec.type == "generation" else 0
        sizes = [padded_tokens(batch, new) for batch in by_tokens.batches]
        rows = [batch.rows.numel() for batch in by_tokens.batches]
        assert all(size <= cap or count == 1 for size, count in zip(sizes, rows)), (task.name, cap, sizes, rows)
        every = torch.cat([batch.rows for batch in by_tokens.batches]).sort().values
        assert torch.equal(every, torch.arange(every.numel()))  # every row (example) exactly once
        if cap == 1:
            assert set(rows) == {1}
        if isinstance(by_tokens.batches[0], (TargetBatch, PromptBatch)):
            # as many rows as fit: the next (no longer) row would have crossed the cap at this batch's length
            for batch, count in zip(by_tokens.batches[:-1], rows):
                assert (count + 1) * (batch.input_ids.shape[1] + new) > cap
        expected, got = outputs(by_rows, model), outputs(by_tokens, model)
        if isinstance(expected, list):
            assert got == expected, task.name
        else:
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_large_cap_packs_more_rows_than_the_row_count(tiny_experts, fewshot_tasks):
    text = fewshot_tasks[2]
    tokenizer = tiny_experts.tokenizer
    assert len(build_scorer(text, tokenizer, 2, "cpu", batch_tokens=10_000).batches) == 1
    assert len(build_scorer(text, tokenizer, 2, "cpu").batches) == (len(text.records) + 1) // 2


def test_without_a_cap_the_batches_are_cut_by_rows():
    order = [4, 0, 3, 1, 2]
    assert cut_sorted(order, 2, None, lambda i: (9 - i,), lambda n, longest: n * longest[0]) == [[4, 0], [3, 1], [2]]
    # lengths 5, 9, 6, 8, 7 in this order (unsorted on purpose: the padded length is the running longest), at
    # most 16 padded tokens: 5 + 9 pads to 18, 9 + 6 to 18, 6 + 8 to 16 (fits), 6 + 8 + 7 to 24
    lengths = {0: 9, 1: 8, 2: 7, 3: 6, 4: 5}
    chunks = cut_sorted(order, 2, 16, lambda i: (lengths[i],), lambda n, longest: n * longest[0])
    assert chunks == [[4], [0], [3, 1], [2]]
    assert cut_sorted(order, 2, 1, lambda i: (lengths[i],), lambda n, longest: n * longest[0]) == [[i] for i in order]
    chunks = cut_sorted(order, 2, 18, lambda i: (lengths[i],), lambda n, longest: n * longest[0])
    assert chunks == [[4, 0], [3, 1], [2]]


def test_batch_tokens_in_the_config(tiny_setup, tmp_path):
    from evox_merge.run.config import SearchConfig
    from tests.test_search import search_config

    config = search_config(tiny_setup, tmp_path / "out")
    assert SearchConfig(**config).batch_tokens is None
    assert SearchConfig(**config, batch_tokens=4096).batch_tokens == 4096
    with pytest.raises(ValueError, match="batch_tokens"):
        SearchConfig(**config, batch_tokens=0)


def test_scored_positions_are_found_once_per_batch(tiny_experts, fewshot_tasks):
    """A language-modelling batch finds its scored positions once; later candidates reuse them."""
    scorer = build_scorer(fewshot_tasks[2], tiny_experts.tokenizer, 4, "cpu")
    first = scorer.row_logprobs(tiny_experts.model)[0]
    positions = [batch.scored for batch in scorer.batches]
    again = scorer.row_logprobs(tiny_experts.model)[0]
    assert all(batch.scored is kept for batch, kept in zip(scorer.batches, positions))
    assert torch.equal(first, again)
    for batch in scorer.batches:
        flat, owners = batch.scored
        assert torch.equal(flat, (batch.targets.flatten() != -100).nonzero().flatten())
        assert torch.equal(owners, flat // batch.targets.shape[1])
