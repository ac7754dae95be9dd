"""Dense (fully fine-tuned) experts (evox_merge/experts/dense.py): exact merges in every mode, streaming equal to
in-RAM, SVD compression, mixed LoRA + dense sets, the full-model release, and errors before any model loads."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from evox_merge.experts import ExpertSet
from evox_merge.experts import expert_set as expert_set_module
from evox_merge.experts.merger import shared_merger
from evox_merge.experts.spaces import build_space
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.problems.static_merges import StaticMerge
from evox_merge.run.release import write_merge
from evox_merge.util.errors import MergeInputError
from tiny_models import write_dense_experts


@pytest.fixture(scope="module")
def dense_dirs(tiny_setup, tmp_path_factory):
    return write_dense_experts(tiny_setup.base_dir, tmp_path_factory.mktemp("dense"))


def thetas(paths):
    """Every expert's full state dict (shards merged), read directly."""
    out = []
    for path in paths:
        state = {}
        for file in sorted(path.glob("*.safetensors")):
            state.update(load_file(file))
        out.append(state)
    return out


def reference(base_state, expert_states, coefficients):
    """theta_0 + sum_i c_i (theta_i - theta_0), parameter by parameter, in float64."""
    return {key: (base + sum(c * (theta[key].double() - base.double()) for c, theta in
                             zip(coefficients.tolist(), expert_states))).float()
            for key, base in base_state.items()}


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_dense_merge_is_the_task_vector_formula(tiny_setup, dense_dirs, mode):
    experts = ExpertSet.load(tiny_setup.base_dir, dense_dirs, dense_mode=mode)
    assert not experts.layers and experts.target_names == list(experts.dense)
    base_state = load_file(tiny_setup.base_dir / "model.safetensors")
    expert_states = thetas(dense_dirs)
    # Expert 1 changes only mlp and norm parameters, expert 2 only attention and the embedding.
    assert {i for t in experts.dense.values() for i in t.expert_index} == {0, 1, 2}
    assert all(("mlp" in n or "norm" in n) for n in experts.adapters[1].parameters)
    assert experts.metadata[2]["kind"] == "dense" and experts.metadata[0]["parameters_changed"] == len(base_state)
    coefficients = torch.tensor([0.7, -0.4, 1.3])
    expected = reference(base_state, expert_states, coefficients)
    merger = shared_merger(experts)
    with merger.merged(coefficients):
        for key, value in experts.model.state_dict().items():
            assert torch.allclose(value, expected[key], atol=1e-6), key
    for key, value in experts.model.state_dict().items():  # restored
        assert torch.equal(value, base_state[key]), key


def test_streaming_and_in_ram_merges_score_identically(tiny_setup, dense_dirs):
    pop = torch.tensor([[0.5, 0.5, 0.5], [1.0, -0.3, 0.2], [0.0, 0.0, 0.0]])
    scores = []
    for mode in ("memory", "stream"):
        experts = ExpertSet.load(tiny_setup.base_dir, dense_dirs, dense_mode=mode)
        scores.append(MergeProblem(experts, tiny_setup.tasks, batch_size=8).evaluate_per_task(pop))
    assert torch.equal(scores[0], scores[1])
    assert not torch.equal(scores[0][0], scores[0][2])  # the merges change the scores


def test_svd_compression_reports_its_error_and_is_exact_at_full_rank(tiny_setup, dense_dirs):
    full = ExpertSet.load(tiny_setup.base_dir, dense_dirs, dense_mode="svd", dense_rank=64)
    low = ExpertSet.load(tiny_setup.base_dir, dense_dirs, dense_mode="svd", dense_rank=2)
    # Linear and Embedding weights become factors (layers); norms and biases stay dense.
    assert "model.embed_tokens" in full.layers and "lm_head" in full.layers
    assert full.dense and all(name.endswith("norm.weight") or name.endswith(".bias") for name in full.dense)
    assert full.metadata[0]["svd_max_relative_error"] < 1e-6
    assert 0.5 < low.metadata[0]["svd_max_relative_error"] < 1
    coefficients = torch.tensor([0.3, 0.9, -0.5])
    exact = ExpertSet.load(tiny_setup.base_dir, dense_dirs)
    with shared_merger(exact).merged(coefficients):
        expected = {k: v.clone() for k, v in exact.model.state_dict().items()}
    with shared_merger(full).merged(coefficients):
        for key, value in full.model.state_dict().items():
            assert torch.allclose(value, expected[key], atol=1e-5), key


def test_a_mixed_set_adds_lora_and_dense_task_vectors(tiny_setup, tiny_experts, dense_dirs):
    mixed = ExpertSet.load(tiny_setup.base_dir, [tiny_setup.adapter_dirs[0], dense_dirs[0], tiny_setup.adapter_dirs[1]],
                           dense_mode="stream")
    assert mixed.expert_names == [tiny_setup.adapter_dirs[0].name, dense_dirs[0].name, tiny_setup.adapter_dirs[1].name]
    coefficients = torch.tensor([0.8, 0.5, -0.6])
    lora_only = torch.tensor([0.8, 0.0, 0.0, 0.0]), torch.tensor([0.0, -0.6, 0.0, 0.0])
    base_state = load_file(tiny_setup.base_dir / "model.safetensors")
    dense_state = thetas(dense_dirs[:1])[0]
    lora_delta = {}
    for c in lora_only:
        with shared_merger(tiny_experts).merged(c):
            for key, value in tiny_experts.model.state_dict().items():
                lora_delta[key] = lora_delta.get(key, 0) + (value.double() - base_state[key].double())
    with shared_merger(mixed).merged(coefficients):
        for key, value in mixed.model.state_dict().items():
            expected = base_state[key].double() + lora_delta[key] + 0.5 * (dense_state[key].double()
                                                                           - base_state[key].double())
            assert torch.allclose(value.double(), expected, atol=1e-5), key
    # A layer space over the mixed targets: equal rows per group are the expert-space merge.
    space = build_space(mixed.target_names, mixed.expert_names, "layer", by="blocks", groups=2)
    problem = MergeProblem(mixed, tiny_setup.tasks, batch_size=8, space=space)
    plain = MergeProblem(mixed, tiny_setup.tasks, batch_size=8)
    assert torch.equal(problem.evaluate_per_task(problem.in_space(coefficients[None])),
                       plain.evaluate_per_task(coefficients[None]))
    with pytest.raises(MergeInputError, match="dense experts' task vectors merge in place only"):
        MergeProblem(mixed, tiny_setup.tasks, batch_size=8, candidates_per_pass=2)


def test_static_operators_and_the_full_model_release(tiny_setup, dense_dirs, tmp_path):
    experts = ExpertSet.load(tiny_setup.base_dir, dense_dirs, dense_mode="stream")
    problem = MergeProblem(experts, tiny_setup.tasks, batch_size=8)
    ties = build_space(experts.target_names, experts.expert_names, "operator", method="ties")
    deltas = ties.deltas(ties.from_expert(torch.full((3,), 0.5)), experts.targets)
    assert set(deltas) == set(experts.dense) and all(torch.isfinite(d).all() for d in deltas.values())
    coefficients = torch.tensor([0.4, 0.6, 0.2])
    info = write_merge(experts, StaticMerge("x", {}, coefficients=coefficients), tmp_path / "release")
    assert info["format"] == "full model" and not (tmp_path / "release" / "adapter").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "release" / "model")
    with shared_merger(experts).merged(coefficients):
        expected = experts.model.state_dict()
        for key, value in reloaded.state_dict().items():
            assert torch.equal(value, expected[key]), key
    assert problem.evaluate_per_task(coefficients[None]).shape == (1, len(tiny_setup.tasks))


def test_dense_targets_restrict_the_merged_parameters(tiny_setup, dense_dirs):
    experts = ExpertSet.load(tiny_setup.base_dir, dense_dirs[:2], dense_targets=[r"\.mlp\."])
    assert experts.dense and all(".mlp." in name for name in experts.dense)
    with pytest.raises(MergeInputError, match=r"dense.targets: pattern 'nothing_here' matches no parameter"):
        ExpertSet.load(tiny_setup.base_dir, dense_dirs[:2], dense_targets=["nothing_here"])


def _copy(path, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(path, target)
    return target


def _no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the error")
    monkeypatch.setattr(expert_set_module, "_load_base_model", refuse)


def test_mismatched_experts_fail_before_any_model_loads(tiny_setup, dense_dirs, tmp_path, monkeypatch):
    other_arch = _copy(dense_dirs[0], tmp_path, "other_arch")
    config = json.loads((other_arch / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (other_arch / "config.json").write_text(json.dumps(config))
    missing = _copy(dense_dirs[0], tmp_path, "missing")
    state = load_file(missing / "model.safetensors")
    state.pop("model.norm.weight")
    save_file(state, missing / "model.safetensors", metadata={"format": "pt"})
    vocab = _copy(dense_dirs[0], tmp_path, "vocab")
    state = load_file(vocab / "model.safetensors")
    state["model.embed_tokens.weight"] = torch.cat([state["model.embed_tokens.weight"]] * 2)
    save_file(state, vocab / "model.safetensors", metadata={"format": "pt"})
    binary = tmp_path / "binary"
    binary.mkdir()
    shutil.copy(dense_dirs[0] / "config.json", binary)
    torch.save({}, binary / "pytorch_model.bin")
    _no_model_load(monkeypatch)
    cases = [
        (other_arch, r"other_arch/config.json: another architecture than the base .*num_hidden_layers: 3 vs"),
        (missing, r"missing: lacks tensor 'model.norm.weight' of the base"),
        (vocab, r"vocab/model.safetensors: tensor 'model.embed_tokens.weight' has shape \[\d+, 64\] but the base"),
        (binary, r"binary: no model.safetensors .*\(it holds \['pytorch_model.bin'\]"),
    ]
    for path, message in cases:
        with pytest.raises(MergeInputError, match=message):
            ExpertSet.load(tiny_setup.base_dir, [dense_dirs[1], path])


def test_non_finite_weights_name_the_file_and_tensor(tiny_setup, dense_dirs, tmp_path):
    broken = _copy(dense_dirs[0], tmp_path, "broken")
    state = load_file(broken / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeInputError, match=r"broken/model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' "
                                              r"holds 1 NaN/inf"):
        ExpertSet.load(tiny_setup.base_dir, [dense_dirs[1], broken])
    with pytest.raises(MergeInputError, match="no parameter differs from the base's"):
        ExpertSet.load(tiny_setup.base_dir, [dense_dirs[1], _copy(tiny_setup.base_dir, tmp_path, "base_copy")])


def test_a_search_over_dense_experts_releases_a_model_that_reproduces_its_scores(tiny_setup, dense_dirs, tmp_path):
    import yaml

    from evox_merge.cli import main
    from evox_merge.run.evaluate import evaluate_model
    from evox_merge.run.search import run_search

    config = {
        "base": str(tiny_setup.base_dir), "experts": [str(p) for p in dense_dirs],
        "tasks": [spec.to_dict() for spec in tiny_setup.tasks],
        "algorithm": {"name": "cmaes", "pop_size": 4}, "budget": {"generations": 3}, "seed": 1, "batch_size": 8,
        "output_dir": str(tmp_path / "run"), "dense": {"mode": "stream"},
    }
    result = run_search(config, progress="quiet")
    recipe = json.loads((result.output_dir / "recipe.json").read_text())
    assert recipe["release_files"]["adapter"] is None and recipe["release_files"]["full_model"] == "best/model"
    assert [e["kind"] for e in recipe["experts"]] == ["dense"] * 3 and recipe["experts"][0]["mode"] == "stream"
    assert not (result.output_dir / "best" / "adapter").exists()
    card = (result.output_dir / "README.md").read_text()
    assert "3 dense (fully fine-tuned) experts" in card and 'AutoModelForCausalLM.from_pretrained("best/model")' in card
    assert "PeftModel" not in card
    spec_file = tmp_path / "tasks.yaml"
    spec_file.write_text(yaml.safe_dump([spec.to_dict() for spec in tiny_setup.tasks]))
    scores = evaluate_model(result.output_dir / "best" / "model", spec_file, split="test")
    for spec in tiny_setup.tasks:
        assert scores[spec.name] == pytest.approx(result.scores["release"]["test"][spec.name], abs=1e-5)
    main(["apply", "--run", str(result.output_dir), "--out", str(tmp_path / "applied")])
    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "applied" / "model").state_dict()
    released = AutoModelForCausalLM.from_pretrained(result.output_dir / "best" / "model").state_dict()
    assert all(torch.equal(applied[key], released[key]) for key in released)
    bad = {**config, "dense": {"mode": "svd"}, "output_dir": str(tmp_path / "bad")}
    with pytest.raises(MergeInputError, match="dense: .*rank: needed with mode: svd"):
        run_search(bad, progress="quiet")
    mergevolve = {**config, "mergevolve": {"generations": 1}, "output_dir": str(tmp_path / "mv")}
    with pytest.raises(MergeInputError, match=r"mergevolve: perturbs a LoRA merge's low-rank delta; experts\[0\]"):
        run_search(mergevolve, progress="quiet")
