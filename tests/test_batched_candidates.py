"""Several candidates per forward pass (unmerged factors, a coefficient per row) must score exactly like merging
each candidate into the weights in place."""

import math

import pytest
import torch

from evox_merge.experts.merger import shared_merger
from evox_merge.experts.rows import candidate_rows
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.tasks import TaskSpec, read_task
from evox_merge.tasks.scorers import build_scorer
from evox_merge.util.errors import MergeInputError

PREFIX = "rev ab: ba\ncopy xy=xy\n"


@pytest.fixture(scope="module")
def population():
    torch.manual_seed(5)
    return torch.randn(3, 4) * 0.8


def scorers(tiny_setup, tokenizer, min_shared_prefix):
    specs = list(tiny_setup.tasks)
    if min_shared_prefix is not None:  # the same tasks after a few-shot prefix: candidates x shared prefix
        specs = [TaskSpec(**{**spec.__dict__, "prefix": PREFIX}) for spec in specs]
    return [build_scorer(read_task(spec), tokenizer, 5, "cpu", min_shared_prefix) for spec in specs]


@pytest.mark.parametrize("min_shared_prefix", [None, 1])
def test_rows_path_equals_in_place_merge_for_every_task_type(tiny_setup, tiny_experts, population, min_shared_prefix):
    model = tiny_experts.model
    merger = shared_merger(tiny_experts)
    choice, generation, text = scorers(tiny_setup, tiny_experts.tokenizer, min_shared_prefix)
    expected = {"choice": [], "generation": [], "text": []}
    for coefficients in population:
        with merger.merged(coefficients):
            expected["choice"].append(choice.choice_logprobs(model))
            expected["generation"].append(generation.completions(model))
            expected["text"].append(text.row_logprobs(model)[0][0])
    before = {name: weight.clone() for name, weight in model.state_dict().items()}
    with candidate_rows(tiny_experts, population) as copies:
        ours_choice = choice.choice_logprobs(model, copies)
        ours_generation = generation.completions(model, copies)
        ours_text = text.row_logprobs(model, copies)[0]
    torch.testing.assert_close(ours_choice, torch.stack(expected["choice"]), rtol=0, atol=1e-4)
    torch.testing.assert_close(ours_text, torch.stack(expected["text"]), rtol=0, atol=1e-4)
    assert ours_generation == expected["generation"]
    assert len({tuple(texts) for texts in ours_generation}) > 1  # the candidates really differ
    assert all(torch.equal(before[name], weight) for name, weight in model.state_dict().items())
    assert not any(module._forward_hooks for module in model.modules())


def test_merge_problem_candidates_per_pass_equals_one_at_a_time(tiny_setup, tiny_experts):
    torch.manual_seed(1)
    pop = torch.randn(5, 4) * 0.5  # chunks of 3 and 2
    pop[3] = 3e38  # a NaN candidate spoils only itself
    plain = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=5).evaluate_per_task(pop)
    batched = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=5, candidates_per_pass=3)
    ours = batched.evaluate_per_task(pop)
    assert torch.isnan(ours[3]).any() and torch.isnan(plain[3]).any()
    keep = [0, 1, 2, 4]
    torch.testing.assert_close(ours[keep], plain[keep], rtol=0, atol=1e-4)
    assert torch.isfinite(ours[keep]).all()
    assert batched.evaluate(pop[:2]).shape == (2,)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_candidates_per_pass_is_checked(tiny_setup, tiny_experts, bad):
    with pytest.raises(MergeInputError, match="candidates_per_pass must be an integer >= 1"):
        MergeProblem(tiny_experts, tiny_setup.tasks, candidates_per_pass=bad)


def test_nan_rows_leave_other_candidates_scored(tiny_setup, tiny_experts):
    generation = build_scorer(read_task(tiny_setup.tasks[1]), tiny_experts.tokenizer, 5, "cpu")
    pop = torch.tensor([[0.1, 0.0, 0.0, 0.0], [3e38] * 4])
    with candidate_rows(tiny_experts, pop) as copies:
        scores = generation.scores(tiny_experts.model, copies)
    assert math.isnan(scores[1]) and math.isfinite(scores[0])
