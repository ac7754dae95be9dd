import math

import pytest
import torch
from evox.algorithms import DE, PSO
from evox.workflows import EvalMonitor
from peft import PeftModel
from transformers import AutoModelForCausalLM

from evox_merge.experts.merger import shared_merger
from evox_merge.algorithms import BoundedCMAES
from evox_merge.util.errors import MergeInputError
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.run.workflow import build_workflow


def peft_weighted_merge(setup, weights):
    """PEFT's own weighted merge: load every adapter, add_weighted_adapter(cat), merge into the base."""
    base = AutoModelForCausalLM.from_pretrained(setup.base_dir)
    model = PeftModel.from_pretrained(base, setup.adapter_dirs[0], adapter_name="e0")
    for index, path in enumerate(setup.adapter_dirs[1:], start=1):
        model.load_adapter(path, adapter_name=f"e{index}")
    names = [f"e{i}" for i in range(len(setup.adapter_dirs))]
    model.add_weighted_adapter(names, weights, "merged", combination_type="cat")
    model.set_adapter("merged")
    return model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def problem(tiny_setup, tiny_experts):
    return MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=5)


def test_in_place_merge_equals_peft_weighted_merge(tiny_setup, tiny_experts):
    torch.manual_seed(3)
    tokens = torch.randint(4, 60, (3, 17))
    merger = shared_merger(tiny_experts)
    for _ in range(2):
        coefficients = torch.randn(4)
        reference = peft_weighted_merge(tiny_setup, coefficients.tolist())
        with torch.no_grad(), merger.merged(coefficients):
            ours = tiny_experts.model(tokens).logits
            theirs = reference(tokens).logits
        assert not torch.allclose(ours, tiny_experts.model(tokens).logits)  # the merge changed something
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_evaluate_restores_base_weights_and_is_order_independent(problem, tiny_experts):
    before = {k: v.clone() for k, v in tiny_experts.model.state_dict().items()}
    torch.manual_seed(0)
    pop = torch.randn(4, 4) * 0.3
    scores = problem.evaluate_per_task(pop)
    reversed_scores = problem.evaluate_per_task(pop.flip(0)).flip(0)
    torch.testing.assert_close(scores, reversed_scores)
    after = tiny_experts.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fitness_is_weighted_mean_of_task_scores(tiny_setup, tiny_experts):
    specs = [spec.__class__(**{**spec.__dict__, "weight": w}) for spec, w in zip(tiny_setup.tasks, [1.0, 0.0, 3.0])]
    problem = MergeProblem(tiny_experts, specs)
    pop = torch.zeros(2, 4)
    pop[1, 0] = 0.5
    fitness = problem.evaluate(pop)
    task_scores = problem.evaluate_per_task(pop)
    expected = (task_scores[:, 0] + 3 * task_scores[:, 2]) / 4
    torch.testing.assert_close(fitness, expected.float())
    assert task_scores[0, 2] < 0  # language modelling scores minus the NLL
    per_task = MergeProblem(tiny_experts, specs, per_task_fitness=True).evaluate(pop)
    assert per_task.shape == (2, 3)


def test_batch_size_and_padding_side_do_not_change_scores(tiny_setup, tiny_experts):
    pop = torch.tensor([[0.2, -0.1, 0.3, 0.0]])
    reference = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=1).evaluate_per_task(pop)
    for side in ("left", "right"):
        tiny_experts.tokenizer.padding_side = side
        batched = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=7).evaluate_per_task(pop)
        torch.testing.assert_close(batched, reference, rtol=0, atol=1e-5)
    tiny_experts.tokenizer.padding_side = "right"


def test_generation_matches_transformers_generate(problem, tiny_experts):
    scorer = problem.scorers[1]
    ours = scorer.completions(tiny_experts.model)
    for record, text in list(zip(scorer.task.records, ours))[:4]:
        ids = tiny_experts.tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
        output = tiny_experts.model.generate(
            ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=tiny_experts.tokenizer.eos_token_id
        )
        reference = tiny_experts.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
        assert text == reference.split("\n")[0]


def test_tasks_are_tokenised_once(problem, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("tokenizer called during evaluation")

    monkeypatch.setattr(type(problem.experts.tokenizer), "__call__", fail)
    problem.evaluate(torch.zeros(2, 4))


@pytest.mark.parametrize(
    "pop, message",
    [
        (torch.zeros(3, 5), r"shape \(P, 4\)"),
        (torch.tensor([[0.0, math.nan, 0.0, 0.0], [0.0] * 4]), r"candidate\(s\) \[0\] are NaN or infinite"),
        (torch.tensor([[0.0] * 4, [0.0, 0.0, math.inf, 0.0]]), r"candidate\(s\) \[1\] are NaN or infinite"),
    ],
)
def test_bad_coefficients_are_refused_before_compute(problem, pop, message):
    with pytest.raises(MergeInputError, match=message):
        problem.evaluate(pop)


def test_nan_candidate_is_ranked_worst_and_reported(problem, caplog):
    pop = torch.zeros(3, 4)
    pop[1] = 3e38  # overflows the merged weights: the model's outputs become NaN
    with caplog.at_level("WARNING"):
        fitness = problem.evaluate(pop)
    assert fitness[1] == -math.inf and torch.isfinite(fitness[[0, 2]]).all()
    assert "candidate(s) [1] scored NaN" in caplog.text
    assert torch.isnan(problem.evaluate_per_task(pop)[1]).any()


@pytest.mark.parametrize("algorithm_class", [PSO, DE, BoundedCMAES])
def test_runs_inside_evox_workflows(problem, algorithm_class):
    """EvoX's own PSO and DE, and its CMAES through our wrapper (EvoX 1.4.0's fails on every step, torch 2.13)."""
    torch.manual_seed(0)
    if algorithm_class is BoundedCMAES:
        algorithm = BoundedCMAES(4, pop_size=4, seed=0)
    else:
        algorithm = algorithm_class(pop_size=4, lb=-torch.ones(4), ub=torch.ones(4))
    monitor = EvalMonitor()
    workflow = build_workflow(algorithm, problem, monitor)
    workflow.init_step()
    for _ in range(2):
        workflow.step()
    best = problem.evaluate(monitor.get_best_solution().unsqueeze(0))[0]
    # EvoX's own monitor sees plain fitness and undoes the workflow's sign flip: its best is a real score
    assert monitor.get_best_fitness() == pytest.approx(float(best), abs=1e-6)


def test_out_of_memory_halves_the_batch_and_retries(tiny_setup, tiny_experts, monkeypatch, caplog):
    """CPU runs cannot be made to run out of memory on purpose: the model's forward raises it for big batches."""
    pop = torch.tensor([[0.1, 0.2, -0.1, 0.0]])
    problem = MergeProblem(tiny_experts, tiny_setup.tasks, batch_size=8)
    expected = problem.evaluate_per_task(pop)
    body = type(tiny_experts.model.base_model)  # every scorer runs it (scoring from hidden states runs only it)
    forward = body.forward

    def small_batches_only(self, input_ids=None, **kwargs):
        if input_ids.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(body, "forward", small_batches_only)
    with caplog.at_level("WARNING"):
        halved = problem.evaluate_per_task(pop)
    torch.testing.assert_close(halved, expected, rtol=0, atol=1e-5)
    assert "out of memory on a batch of 8 rows: halved to 4" in caplog.text
    assert max(batch.rows.numel() for scorer in problem.scorers for batch in scorer.batches) <= 2
    assert problem.scorers[0].batches[0].rows.numel() == 1  # multiple choice: 1 example x 3 choices fits
