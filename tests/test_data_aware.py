"""Data-aware static merges: Fisher merging, RegMean (evox_merge/problems/data_aware.py) and AdaMerging
(evox_merge/problems/adamerging.py), on the tiny LoRA experts and by their formulas."""

import json

import pytest
import torch

from evox_merge.experts.kernel import target_delta
from evox_merge.problems import adamerging as ada
from evox_merge.problems import data_aware
from evox_merge.problems.data_objectives import batch_terms, objective_batches
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.static_merges import STATIC_MERGES, tune_static_merge
from evox_merge.util.errors import MergeInputError


@pytest.fixture(scope="module")
def problem(tiny_setup, tiny_experts):
    return MergeProblem(tiny_experts, tiny_setup.tasks)


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_regmean_with_identity_grams_is_the_average():
    task_vectors = _random(3, 5, 7)
    grams = torch.eye(7).expand(3, 7, 7) * 2.5  # any common multiple of the identity
    for alpha in (0.3, 1.0):
        torch.testing.assert_close(data_aware.regmean_delta(task_vectors, grams, alpha), task_vectors.mean(0))


def test_regmean_solves_the_regression():
    """RegMean's merge minimises sum_i ||X_i W - X_i W_i||^2 (alpha 1): the normal equations hold."""
    task_vectors = _random(2, 4, 6, seed=1).double()
    inputs = [_random(20, 6, seed=2 + i).double() for i in range(2)]
    grams = torch.stack([x.T @ x for x in inputs])
    merged = data_aware.regmean_delta(task_vectors, grams, 1.0).double()
    gradient = sum((merged - tau) @ gram for tau, gram in zip(task_vectors, grams))
    assert gradient.abs().max() < 1e-4
    one_expert = data_aware.regmean_delta(task_vectors[:1], grams[:1], 0.5)
    torch.testing.assert_close(one_expert, task_vectors[0].float())


def test_fisher_with_equal_fishers_is_the_average_and_weights_otherwise():
    task_vectors = _random(3, 4, 5)
    fishers = _random(4, 5, seed=3).abs().expand(3, 4, 5)
    torch.testing.assert_close(data_aware.fisher_weighted_delta(task_vectors, fishers), task_vectors.mean(0))
    mask = _random(4, 5, seed=4) > 0  # expert 0 informed there, experts 1 and 2 elsewhere
    skewed = torch.stack([mask.float(), (~mask).float(), (~mask).float()])
    merged = data_aware.fisher_weighted_delta(task_vectors, skewed, floor=1e-9)
    expected = torch.where(mask, task_vectors[0], task_vectors[1:].mean(0))
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


def test_bad_hyperparameters_fail_naming_the_method_and_key(problem):
    grams = torch.eye(5).expand(2, 5, 5).clone()
    grams[1, 2, 3] = float("nan")
    with pytest.raises(MergeInputError, match=r"regmean: gram\['target'\] of expert 1 has NaN"):
        data_aware.regmean_delta(_random(2, 3, 5), grams)
    with pytest.raises(MergeInputError, match=r"regmean: alpha must be"):
        data_aware.regmean(problem, alphas=(0.5, 1.5))
    with pytest.raises(MergeInputError, match=r"fisher: the Fisher of expert 0 for target 'target' has NaN"):
        data_aware.fisher_weighted_delta(_random(2, 3), torch.full((2, 3), float("nan")))
    with pytest.raises(MergeInputError, match=r"fisher: floor must be"):
        data_aware.fisher(problem, floor=0.0)
    for settings, key in (({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"), ({"objective": "accuracy"}, "objective"),
                          ({"init": 2.0}, "init")):
        with pytest.raises(MergeInputError, match=rf"adamerging: {key} must be"):
            ada.adamerging(problem, **settings)
    with pytest.raises(MergeInputError, match=r"adamerging_layer: steps must be"):
        ada.adamerging(problem, layer_wise=True, steps=1.5)


def test_differentiable_merge_is_the_in_place_merge(problem):
    """The functional merge AdaMerging differentiates gives the model the in-place merger writes."""
    experts = problem.experts
    coefficients = torch.tensor([0.7, -0.2, 1.1, 0.4])
    batches = objective_batches(problem, rows_per_batch=6)
    merge = ada.DifferentiableMerge(experts)
    with torch.no_grad():
        functional = [batch_terms(experts.model, b, "supervised", merge.parameters(coefficients))[0] for b in batches]
        with problem.merger.merged(coefficients):
            in_place = [batch_terms(experts.model, b, "supervised")[0] for b in batches]
    for f, i in zip(functional, in_place):
        torch.testing.assert_close(f, i, atol=1e-4, rtol=1e-4)
    # the per-target form with every row equal is the same merge
    rows = coefficients.expand(len(experts.target_names), -1)
    for name, value in merge.parameters(rows).items():
        torch.testing.assert_close(value, merge.parameters(coefficients)[name])


def test_objective_terms_do_not_depend_on_the_batching(problem):
    whole = objective_batches(problem, rows_per_batch=64)
    single = objective_batches(problem, one_example=True)
    model = problem.experts.model
    with torch.no_grad():
        for term in ("loglik", "supervised", "entropy"):
            a = {k: sum(float(batch_terms(model, b, term)[0].sum()) for b in whole if b.task == k) for k in range(3)}
            b = {k: sum(float(batch_terms(model, b, term)[0].sum()) for b in single if b.task == k) for k in range(3)}
            assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.parametrize("layer_wise,objective", [(False, "entropy"), (True, "entropy"), (False, "supervised")])
def test_adamerging_decreases_its_objective_and_stays_in_the_box(problem, layer_wise, objective):
    merge = ada.adamerging(problem, layer_wise=layer_wise, objective=objective, steps=6, lb=-0.5, ub=0.6)
    history = merge.settings["objective_history"]
    assert len(history) == 7 and merge.settings["objective_end"] < merge.settings["objective_start"]
    learned = torch.tensor(merge.settings["coefficients"])
    assert learned.shape == ((len(problem.experts.target_names), 4) if layer_wise else (4,))
    assert learned.min() >= -0.5 and learned.max() <= 0.6 and not torch.allclose(learned, torch.tensor(0.3))
    torch.testing.assert_close(merge.score(problem), merge.validation_scores)
    assert merge.coefficients is None and set(merge.delta_dict()) == set(problem.experts.target_names)
    if not layer_wise:  # the deltas are the linear merge of the learned coefficients
        torch.testing.assert_close(merge.validation_scores, problem.evaluate_linear(learned.unsqueeze(0))[0],
                                   atol=1e-6, rtol=1e-6)


def test_regmean_grams_count_only_real_tokens(problem):
    """Gram matrices from padded batches equal those from one unpadded row at a time."""
    padded = data_aware.expert_grams(problem, 1, objective_batches(problem, rows_per_batch=16))
    unpadded = data_aware.expert_grams(problem, 1, objective_batches(problem, one_row=True))
    for name in padded:
        torch.testing.assert_close(padded[name], unpadded[name], rtol=1e-4, atol=1e-4)
    assert set(padded) == set(problem.experts.layers)


def test_fisher_and_regmean_tune_on_the_problem(problem):
    weights = {name: p.detach().clone() for name, p in problem.experts.model.named_parameters()}
    fisher = data_aware.fisher(problem, scalings=(1.0, 3.0))
    regmean = data_aware.regmean(problem, alphas=(0.5,), scalings=(2.0,))
    for name, p in problem.experts.model.named_parameters():  # the shared model is left as it was
        assert torch.equal(p, weights[name]) and not p.requires_grad and p.grad is None
    assert fisher.settings["grid"] == {"scaling": [1.0, 3.0]} and fisher.settings["examples"] == 36
    torch.testing.assert_close(fisher.score(problem), fisher.validation_scores)
    assert regmean.settings["alpha"] == 0.5 and regmean.settings["linear_targets"] == len(problem.experts.layers)
    # RegMean at alpha 0.5 is not the plain mean of the task vectors (the data weighs the inputs)
    name = next(iter(problem.experts.layers))
    mean = target_delta(problem.experts.layers[name], torch.full((4,), 0.25))
    assert not torch.allclose(regmean.deltas[name] / 2.0, mean, atol=1e-6)


def test_registered_by_name(problem):
    for name in ("fisher", "regmean", "adamerging", "adamerging_layer", "adamerging_supervised"):
        assert name in STATIC_MERGES
    merge = tune_static_merge("adamerging_supervised", problem)
    assert merge.name == "adamerging_supervised" and merge.settings["objective"] == "supervised"


def test_the_release_contest_holds_data_aware_merges_only_when_named(tiny_setup, tmp_path):
    from evox_merge.problems.static_names import CONTEST_STATIC_MERGES, DATA_AWARE_STATIC_MERGES
    from evox_merge.run.config import load_config
    from evox_merge.run.search import run_search
    from evox_merge.util.errors import MergeInputError as InputError
    from tests.test_search import search_config

    assert not set(CONTEST_STATIC_MERGES) & set(DATA_AWARE_STATIC_MERGES)
    assert load_config(search_config(tiny_setup, tmp_path / "a")).release.contest() == list(CONTEST_STATIC_MERGES)
    everything = load_config(search_config(tiny_setup, tmp_path / "a", release={"baselines": "all"}))
    assert set(everything.release.contest()) >= set(DATA_AWARE_STATIC_MERGES) | set(CONTEST_STATIC_MERGES)
    named = search_config(tiny_setup, tmp_path / "named", budget={"generations": 2},
                          release={"baselines": ["regmean", "task_arithmetic"]})
    run_search(named, progress="quiet")
    recipe = json.loads((tmp_path / "named" / "recipe.json").read_text())
    statics = [c["name"] for c in recipe["selection"]["candidates"] if c["kind"] == "static"]
    assert statics == ["task_arithmetic", "regmean"]
    with pytest.raises(InputError, match="release.baselines.*unknown static merges.*'fishr'"):
        load_config(search_config(tiny_setup, tmp_path / "b", release={"baselines": ["fishr"]}))
