"""Static merges (evox_merge/problems/static_merges.py): linear baselines, TIES and DARE via peft.utils.merge_utils."""

import pytest
import torch
from peft.utils import merge_utils
from safetensors.torch import load_file

from evox_merge.experts.kernel import dense_task_vectors
from evox_merge.problems import static_merges as baselines
from evox_merge.problems.merge_problem import MergeProblem


@pytest.fixture(scope="module")
def problem(tiny_setup, tiny_experts):
    return MergeProblem(tiny_experts, tiny_setup.tasks[:2])


def test_linear_baselines_pick_the_best_candidate(problem):
    single = baselines.best_single_expert(problem)
    all_singles = problem.aggregate(problem.evaluate_per_task(torch.eye(4)))
    assert single.fitness == pytest.approx(float(all_singles.max()))
    assert single.settings["expert"] == problem.experts.expert_names[int(all_singles.argmax())]
    arithmetic = baselines.task_arithmetic(problem, scalings=(0.1, 0.5))
    assert arithmetic.coefficients.tolist() == pytest.approx([arithmetic.settings["scaling"]] * 4)
    assert baselines.base_model(problem).coefficients.abs().sum() == 0
    assert baselines.model_soup(problem).coefficients.tolist() == [0.25] * 4


def test_ties_equals_peft_merge_utils_and_scores_through_the_problem(problem):
    merge = baselines.dense_merge(problem, "ties", density=0.3, scalings=(0.4,))
    layer = "model.layers.0.self_attn.q_proj"
    task_vectors = list(dense_task_vectors(problem.experts.layers[layer], 4))
    expected = merge_utils.ties(task_vectors, torch.full((4,), 0.4), 0.3)
    torch.testing.assert_close(merge.delta_dict()[layer], expected)
    torch.testing.assert_close(merge.score(problem), merge.validation_scores)


@pytest.mark.parametrize("density", [0.01, 0.3, 0.77, 1.0])
def test_batched_magnitude_pruning_is_peft_s_per_expert(density):
    """Our threshold pruning (kthvalue, or a lookup in the sorted table an operator space keeps) keeps exactly the
    entries peft's topk pruning keeps (no ties in random floats)."""
    from evox_merge.experts.kernel import magnitude_prune, sorted_magnitudes

    task_vectors = torch.randn(3, 37, 53, generator=torch.Generator().manual_seed(int(density * 100)))
    task_vectors[1] = 0.0  # an expert that does not change this layer
    expected = torch.stack([merge_utils.magnitude_based_pruning(t, density) for t in task_vectors])
    assert torch.equal(magnitude_prune(task_vectors, density), expected)
    assert torch.equal(magnitude_prune(task_vectors, density, sorted_magnitudes(task_vectors)), expected)
    assert torch.equal(magnitude_prune(task_vectors, 0.0004), torch.zeros_like(task_vectors))  # k = 0 keeps none


def test_dare_is_seeded_and_leaves_global_rng_alone(problem):
    state = torch.random.get_rng_state()
    first = baselines.dense_merge(problem, "dare_linear", density=0.5, scalings=(0.5,), seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = baselines.dense_merge(problem, "dare_linear", density=0.5, scalings=(0.5,), seed=1)
    other = baselines.dense_merge(problem, "dare_linear", density=0.5, scalings=(0.5,), seed=2)
    layer = next(iter(first.delta_dict()))
    assert first.deltas is None  # the tuned merge holds no dense delta: its masks are redrawn from the seed
    assert torch.equal(first.delta_dict()[layer], first.delta_dict()[layer])
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first.delta_dict()[layer], again.delta_dict()[layer])
    assert not torch.equal(first.delta_dict()[layer], other.delta_dict()[layer])


def test_every_static_merge_is_tuned_on_the_problem_and_rescores_to_its_fitness(problem):
    for name in baselines.STATIC_MERGES:
        merge = baselines.tune_static_merge(name, problem, seed=1)
        assert merge.name in (name, "dare_ties")
        rescored = float(problem.aggregate(merge.score(problem).unsqueeze(0))[0])
        assert rescored == pytest.approx(merge.fitness, abs=1e-6)
    with pytest.raises(ValueError, match="unknown static merge"):
        baselines.tune_static_merge("soup", problem)


@pytest.mark.parametrize("density", [0.0001, 0.3, 1.0])
def test_ties_by_blocks_of_rows_equals_the_whole_layer_merge(density, monkeypatch):
    """The operator space's TIES (`ties_layer_delta`: a LoRA layer's task vectors built, pruned and merged block by
    block of rows, thresholds from the sorted table) equals pruning and merging the whole layer at once, entry for
    entry, with uneven ranks, an expert that does not target the layer and blocks that do not divide the rows."""
    from evox_merge.experts import kernel

    generator = torch.Generator().manual_seed(7)
    ranks = [4, 0, 8, 2]
    layer = kernel.LayerFactors(torch.randn(sum(ranks), 29, generator=generator),
                                torch.randn(41, sum(ranks), generator=generator),
                                torch.cat([torch.full((r,), i) for i, r in enumerate(ranks)]))
    weights = torch.tensor([0.3, 0.9, -0.5, 1.2])
    task_vectors = kernel.dense_task_vectors(layer, 4)
    whole = kernel._ties_merge(kernel.magnitude_prune(task_vectors, density), weights)
    monkeypatch.setattr(kernel, "TIES_BLOCK_ENTRIES", 29 * 6)  # 6 rows a block: 7 blocks, the last of 5 rows
    blocks = kernel.operator_delta(layer, 4, "ties", weights, density, kernel.sorted_magnitudes(task_vectors))
    assert torch.equal(blocks, whole)
    assert torch.equal(kernel.operator_delta(layer, 4, "ties", weights, density), whole)  # no table: whole layer
    if density < 1:
        torch.testing.assert_close(whole, merge_utils.ties(list(task_vectors), weights, density))


# --- DELLA, Breadcrumbs, Model Stock, SLERP / NuSLERP / multi-SLERP, SCE, RankMean (static_methods, merge_methods) ---

NEW = ("della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "model_stock", "slerp", "nuslerp", "multislerp",
       "sce", "rankmean")


def test_the_new_merges_are_registered_once_in_the_one_list():
    from evox_merge.problems.static_names import STATIC_MERGE_NAMES

    assert set(NEW) <= set(baselines.STATIC_MERGES) and STATIC_MERGE_NAMES == tuple(baselines.STATIC_MERGES)


def test_breadcrumbs_keeps_exactly_the_middle_band():
    from evox_merge.experts.merge_methods import breadcrumbs_prune

    magnitudes = torch.arange(1, 21, dtype=torch.float32)  # 20 distinct magnitudes, shuffled, signs mixed
    order = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    tv = (magnitudes * torch.where(torch.arange(20) % 3 == 0, -1.0, 1.0))[order].reshape(4, 5)
    kept = breadcrumbs_prune(tv, density=0.5, gamma=0.1)  # drop the 2 largest and the 8 smallest
    band = (tv.abs() >= 9) & (tv.abs() <= 18)
    assert torch.equal(kept, torch.where(band, tv, 0))
    wide = breadcrumbs_prune(tv, density=0.95, gamma=0.1)  # 19 kept: only 1 outlier can go, no small entry
    assert torch.equal(wide, torch.where(tv.abs() <= 19, tv, 0))
    assert torch.equal(breadcrumbs_prune(tv, 1.0, 0.1), tv)


def test_magprune_keep_probabilities_follow_the_magnitude_rank_and_rescale_by_them():
    from evox_merge.experts.merge_methods import magprune

    row = torch.tensor([0.5, -4.0, 1.0, -2.0, 3.0])  # ranks by magnitude: 1, 5, 2, 3, 4
    density, epsilon = 0.5, 0.2
    expected = torch.tensor([0.3, 0.7, 0.4, 0.5, 0.6])  # density - eps + 2 eps (rank - 1) / (n - 1)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([magprune(row, density, epsilon, generator, rescale="none") for _ in range(20000)])
    torch.testing.assert_close((draws != 0).double().mean(0), expected.double(), atol=0.015, rtol=0)
    once = magprune(row, density, epsilon, torch.Generator().manual_seed(1))  # the paper's 1 / keep probability
    torch.testing.assert_close(once, torch.where(once != 0, row / expected, 0))
    l1 = magprune(row, density, epsilon, torch.Generator().manual_seed(1), rescale="l1")
    assert torch.equal(l1 != 0, once != 0)
    assert float(l1.abs().sum()) == pytest.approx(float(row.abs().sum()), rel=1e-6)


def test_combine_elects_signs_with_conflicts_and_zero_weights():
    from evox_merge.experts.merge_methods import combine

    pruned = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, 0.0], [-1.0, -1.0, 0.0]])
    ones = torch.ones(3)
    assert combine(pruned, ones, elect=True, normalize=True).tolist() == [2.0, -1.5, 0.0]  # DELLA's disjoint mean
    assert combine(pruned, ones, elect=True, normalize=False).tolist() == [4.0, -3.0, 0.0]  # breadcrumbs_ties
    assert combine(pruned, ones, elect=False, normalize=False).tolist() == [3.0, -2.0, 0.0]  # a plain sum
    # expert 1 weighted 0: its entries count neither in the election nor in the mean
    assert combine(pruned, torch.tensor([1.0, 0.0, 1.0]), elect=True, normalize=True).tolist() == [1.0, -1.5, 0.0]


def test_model_stock_ratio_for_orthogonal_parallel_and_equiangular_deltas():
    from evox_merge.experts.merge_methods import model_stock_delta, model_stock_ratio

    e = torch.eye(3)
    assert float(model_stock_ratio(e[:2])) == 0.0  # orthogonal: cos 0, the base
    assert torch.equal(model_stock_delta(e[:2]), torch.zeros(3))
    parallel = torch.stack([e[0], 2 * e[0]])
    assert float(model_stock_ratio(parallel)) == pytest.approx(1.0)  # cos 1: t = 2 / 2, the average itself
    torch.testing.assert_close(model_stock_delta(parallel), 1.5 * e[0])
    equiangular = torch.tensor([[1.0, 0, 0], [0.5, 3 ** 0.5 / 2, 0], [0.5, 3 ** 0.5 / 6, (2 / 3) ** 0.5]])
    assert float(model_stock_ratio(equiangular)) == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), abs=1e-6)  # 0.75


def test_slerp_endpoints_midpoint_and_equal_experts():
    from evox_merge.experts.merge_methods import multislerp, nuslerp, slerp

    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    for interpolate in (slerp, nuslerp):
        torch.testing.assert_close(interpolate(0.0, a, b), a)
        torch.testing.assert_close(interpolate(1.0, a, b), b)
        middle = interpolate(0.5, a, b)
        assert float(middle.norm()) == pytest.approx(1.0, abs=1e-6)
        torch.testing.assert_close(middle, (a + b) / 2 ** 0.5)
        same = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
        torch.testing.assert_close(interpolate(0.37, same, same), same)  # SLERP of two equal experts: that expert
    torch.testing.assert_close(multislerp(torch.stack([a, b]), torch.ones(2)), (a + b) / 2 ** 0.5)
    torch.testing.assert_close(multislerp(torch.stack([same, same, same]), torch.ones(3)), same)


def test_sce_selects_by_variance_weighs_by_squares_and_erases_minority_signs():
    from evox_merge.experts.merge_methods import sce_delta

    tv = torch.tensor([[2.0, 1.0, 0.5, -1.0], [-2.0, 3.0, 0.5, 3.0]])
    w0, w1 = (4 + 1 + 0.25 + 1) / 4, (4 + 9 + 0.25 + 9) / 4  # mean squares (normalising cancels in the mean)
    # entry 0: sum 0 elects +, only expert 0 agrees -> 2; entry 1: both agree -> their square-weighted mean;
    # entry 2: equal values -> 0.5; entry 3: sum 2 elects +, only expert 1 agrees -> 3
    expected = torch.tensor([2.0, (w0 * 1 + w1 * 3) / (w0 + w1), 0.5, 3.0])
    torch.testing.assert_close(sce_delta(tv, 1.0), expected)
    # variances 4, 1, 0, 4: select_topk 0.5 of the 3 that vary keeps 1 entry (0 or 3, tied), zeroing the rest
    selected = sce_delta(tv, 0.5)
    assert int((selected != 0).sum()) == 1 and selected[1] == 0 and selected[2] == 0


def test_rankmean_weights_are_ranks_over_their_sum():
    from evox_merge.experts.merge_methods import rankmean_weights

    weights = rankmean_weights(torch.tensor([[1.0, 3.0, 2.0], [3.0, 2.0, 1.0]]))
    expected = torch.tensor([[1 / 4, 3 / 5, 2 / 3], [3 / 4, 2 / 5, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(weights, expected)


@pytest.fixture(scope="module")
def dense_problem(tiny_setup, tmp_path_factory):
    from evox_merge.experts import ExpertSet
    from tiny_models import write_dense_experts

    dirs = write_dense_experts(tiny_setup.base_dir, tmp_path_factory.mktemp("dense_static"))
    return MergeProblem(ExpertSet.load(tiny_setup.base_dir, dirs), tiny_setup.tasks[:1]), dirs


def test_the_new_merges_tune_on_lora_experts_record_their_grid_and_rescore(problem):
    for name in NEW:
        merge = baselines.tune_static_merge(name, problem, seed=1)
        assert merge.name == name and merge.deltas is None  # held by no tuned merge: recomputed when needed
        assert set(merge.delta_dict()) == set(problem.experts.target_names)
        for key, values in merge.settings["grid"].items():
            assert merge.settings[key] in values
        assert merge.settings["operator"]
        rescored = float(problem.aggregate(merge.score(problem).unsqueeze(0))[0])
        assert rescored == pytest.approx(merge.fitness, abs=1e-6)


def test_the_new_merges_on_dense_experts_use_theta_minus_theta0_from_the_files(dense_problem):
    from evox_merge.experts.merge_methods import model_stock_delta
    from evox_merge.problems import static_methods

    problem, dirs = dense_problem
    experts = problem.experts
    for name in NEW:
        merge = baselines.tune_static_merge(name, problem, seed=1)
        deltas = merge.delta_dict()
        assert set(deltas) == set(experts.target_names)
        assert all(bool(torch.isfinite(d).all()) for d in deltas.values()), name
        rescored = float(problem.aggregate(merge.score(problem).unsqueeze(0))[0])
        assert rescored == pytest.approx(merge.fitness, abs=1e-6), name
    base = load_file(str(experts.base_path) + "/model.safetensors")
    thetas = []
    for path in dirs:
        state = {}
        for file in sorted(path.glob("*.safetensors")):
            state.update(load_file(file))
        thetas.append(state)
    summed = static_methods.breadcrumbs_deltas(experts, density=1.0)  # nothing dropped: the sum of task vectors
    stock = static_methods.model_stock_deltas(experts)
    for key in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        tv = torch.stack([theta[key] - base[key] for theta in thetas])
        torch.testing.assert_close(summed[key], tv.sum(0))
        torch.testing.assert_close(stock[key], model_stock_delta(tv))


def test_lora_merges_use_each_expert_s_exact_delta_w(problem):
    from evox_merge.experts.kernel import merged_delta
    from evox_merge.experts.merge_methods import slerp
    from evox_merge.problems import static_methods

    experts = problem.experts
    summed = static_methods.della_deltas(experts, density=1.0, linear=True)  # DELLA-linear keeping all: TA at 1
    for name, layer in experts.layers.items():
        torch.testing.assert_close(summed[name], merged_delta(layer, torch.ones(4)), atol=1e-6, rtol=1e-5)
    layer = "model.layers.0.self_attn.q_proj"
    tv = dense_task_vectors(experts.layers[layer], 4)
    w0 = experts.target_weight(layer).detach()
    slerped = static_methods.slerp_deltas(experts, 0.3, pair=(0, 2))[layer]
    torch.testing.assert_close(slerped, slerp(0.3, w0 + tv[0], w0 + tv[2]) - w0)


def test_della_masks_are_seeded_and_leave_the_global_rng_alone(problem):
    from evox_merge.problems import static_methods

    state = torch.random.get_rng_state()
    first = static_methods.della_deltas(problem.experts, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = static_methods.della_deltas(problem.experts, seed=4)
    other = static_methods.della_deltas(problem.experts, seed=5)
    layer = next(iter(first))
    assert torch.equal(first[layer], again[layer]) and not torch.equal(first[layer], other[layer])


def test_two_expert_merges_pick_the_two_best_single_experts(problem):
    from evox_merge.problems import static_methods

    fitness = problem.aggregate(problem.evaluate_linear(torch.eye(4)))
    i, j = static_methods.best_pair(problem)
    assert float(fitness[i]) == float(fitness.max()) and i != j
    assert float(fitness[j]) == max(float(fitness[k]) for k in range(4) if k != i)
    merge = static_methods.interpolation(problem, "nuslerp", ts=(0.5,))
    assert merge.settings["experts"] == [problem.experts.expert_names[i], problem.experts.expert_names[j]]


def test_bad_hyperparameters_are_refused_naming_the_method_or_key(problem):
    from evox_merge.problems import static_methods

    experts = problem.experts
    with pytest.raises(ValueError, match="slerp interpolates two experts; this set has 4"):
        static_methods.slerp_deltas(experts, 0.5)
    with pytest.raises(ValueError, match="nuslerp: pair"):
        static_methods.nuslerp_deltas(experts, 0.5, pair=(1, 1))
    for density in (0.0, 1.5):
        with pytest.raises(ValueError, match="density must be in"):
            static_methods.della_deltas(experts, density=density)
    with pytest.raises(ValueError, match="epsilon"):
        static_methods.della_deltas(experts, density=0.5, epsilon=0.6)
    with pytest.raises(ValueError, match="gamma"):
        static_methods.breadcrumbs_deltas(experts, gamma=1.0)
    with pytest.raises(ValueError, match="select_topk"):
        static_methods.sce_deltas(experts, 0.0)
    with pytest.raises(ValueError, match="multislerp: weights"):
        static_methods.multislerp_deltas(experts, [1.0, -1.0, 0.0, 0.0])


def test_the_new_merges_compete_in_the_release_contest_and_write_through_apply(problem, tiny_setup, tmp_path):
    """Each new merge, tuned on a search part, is scored on a selection part with the searched candidates, and
    written as the PEFT adapter `evox-merge apply` / the release writes: exactly its deltas."""
    from evox_merge.run.recipe import operator
    from evox_merge.run.release import write_merge
    from evox_merge.run.selection import select_release, static_candidates

    selection = MergeProblem(problem.experts, tiny_setup.tasks[2:])
    statics = static_candidates(problem, list(NEW), seed=3)
    winner = select_release(statics, selection)
    assert all(c.selection_fitness is not None for c in statics)
    assert winner.selection_fitness == max(c.selection_fitness for c in statics)
    assert operator(winner.merge.settings, winner.name) == winner.merge.settings["operator"]
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    for candidate in statics:
        deltas = candidate.merge.delta_dict()
        out = tmp_path / candidate.name
        info = write_merge(problem.experts, candidate.merge, out)
        assert info["exact"] and info["max_relative_error"] < 1e-6
        tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        for key in (k for k in tensors if k.endswith(suffix)):
            layer = key[len(prefix):-len(suffix)]
            written = tensors[key.replace("lora_A", "lora_B")].double() @ tensors[key].double()
            torch.testing.assert_close(written, deltas[layer].double(), atol=1e-5, rtol=1e-4)
