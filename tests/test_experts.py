import json
import shutil

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import Qwen2ForCausalLM

from evox_merge.experts.kernel import dense_task_vectors, merged_delta
from evox_merge.zoo.char_tokenizer import build_char_tokenizer
from evox_merge.util.errors import MergeInputError
from evox_merge.experts import ExpertSet
from tiny_models import tiny_config


def copy_adapter(source, target):
    shutil.copytree(source, target)
    return target


def test_stacked_factors_match_each_expert(tiny_setup, tiny_experts):
    assert tiny_experts.num_experts == 4
    layer = "model.layers.0.self_attn.q_proj"
    factors = tiny_experts.layers[layer]
    # experts 0, 1, 2 target q_proj with ranks 4, 8, 2; expert 3 does not
    assert factors.expert_of_rank.tolist() == [0] * 4 + [1] * 8 + [2] * 2
    adapter = tiny_experts.adapters[2]
    scaling = 4 / 2**0.5  # rsLoRA: alpha / sqrt(r)
    expected = scaling * adapter.lora_B[layer] @ adapter.lora_A[layer]
    delta = merged_delta(factors, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(delta, expected)
    dense = dense_task_vectors(factors, 4)
    assert dense.shape == (4, 64, 64) and torch.count_nonzero(dense[3]) == 0


def test_metadata_records_paths_hashes_ranks_targets(tiny_experts):
    meta = tiny_experts.metadata
    assert [m["name"] for m in meta] == ["expert_0", "expert_1", "expert_2", "expert_3"]
    assert len({m["sha256"] for m in meta}) == 4 and all(len(m["sha256"]) == 64 for m in meta)
    assert set(meta[1]["ranks"].values()) == {8} and meta[2]["use_rslora"]
    assert "model.layers.1.mlp.gate_proj" in meta[3]["target_modules"]
    assert len(tiny_experts.base_hash) == 64


def test_fewer_than_two_experts(tiny_setup):
    with pytest.raises(MergeInputError, match="at least 2 experts, got 1"):
        ExpertSet.load(tiny_setup.base_dir, tiny_setup.adapter_dirs[:1])


def test_duplicate_expert_path_and_duplicate_weights(tiny_setup, tmp_path):
    first = tiny_setup.adapter_dirs[0]
    with pytest.raises(MergeInputError, match="duplicate expert"):
        ExpertSet.load(tiny_setup.base_dir, [first, first])
    clone = copy_adapter(first, tmp_path / "clone")
    with pytest.raises(MergeInputError, match="holds the same weights as"):
        ExpertSet.load(tiny_setup.base_dir, [first, clone])


def test_missing_and_corrupt_files_are_named(tiny_setup, tmp_path):
    broken = copy_adapter(tiny_setup.adapter_dirs[1], tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(MergeInputError, match=r"broken/adapter_model\.safetensors: not a readable safetensors"):
        ExpertSet.load(tiny_setup.base_dir, [tiny_setup.adapter_dirs[0], broken])
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(MergeInputError, match=r"broken/adapter_model\.safetensors: missing"):
        ExpertSet.load(tiny_setup.base_dir, [tiny_setup.adapter_dirs[0], broken])
    (broken / "adapter_config.json").write_text("{oops")
    with pytest.raises(MergeInputError, match=r"broken/adapter_config\.json is not valid JSON \(.* at line 1, column 2\)"):
        ExpertSet.load(tiny_setup.base_dir, [tiny_setup.adapter_dirs[0], broken])
    with pytest.raises(MergeInputError, match=r"experts\[1\]: .*nowhere does not exist"):
        ExpertSet.load(tiny_setup.base_dir, [tiny_setup.adapter_dirs[0], tmp_path / "nowhere"])


def test_unsupported_adapter_type_lists_supported(tiny_setup, tmp_path):
    model = Qwen2ForCausalLM.from_pretrained(tiny_setup.base_dir)
    ia3 = get_peft_model(model, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(MergeInputError, match=r"adapter_config\.json: field 'peft_type' is 'IA3'; supported .*LORA"):
        ExpertSet.load(tiny_setup.base_dir, [tiny_setup.adapter_dirs[0], tmp_path / "ia3"])


def test_unsupported_lora_feature_is_named(tiny_setup, tmp_path):
    dora = copy_adapter(tiny_setup.adapter_dirs[1], tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(MergeInputError, match="field 'use_dora' is set; DoRA"):
        ExpertSet.load(tiny_setup.base_dir, [tiny_setup.adapter_dirs[0], dora])


@pytest.fixture(scope="module")
def foreign_adapter(tmp_path_factory):
    """An adapter trained from a different base (hidden size 32), saved with its base."""
    root = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(tiny_config(len(build_char_tokenizer()), hidden_size=32))
    model.save_pretrained(root / "base")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = str(root / "base")
    peft_model.save_pretrained(root / "adapter")
    return root


def test_adapter_from_another_base_by_config(tiny_setup, foreign_adapter):
    with pytest.raises(MergeInputError, match=r"config differs from the base .*hidden_size: 32 vs 64"):
        ExpertSet.load(tiny_setup.base_dir, [tiny_setup.adapter_dirs[0], foreign_adapter / "adapter"])


def test_adapter_from_another_base_by_shapes(tiny_setup, foreign_adapter, tmp_path):
    moved = copy_adapter(foreign_adapter / "adapter", tmp_path / "moved")
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "somewhere/else"}))
    with pytest.raises(MergeInputError, match=r"give a \(32, 32\) delta but the base layer is \(64, 64\)"):
        ExpertSet.load(tiny_setup.base_dir, [tiny_setup.adapter_dirs[0], moved])


def test_adapter_targeting_a_module_the_base_lacks(tiny_setup, tmp_path):
    from safetensors.torch import load_file, save_file

    odd = copy_adapter(tiny_setup.adapter_dirs[0], tmp_path / "odd")
    tensors = load_file(odd / "adapter_model.safetensors")
    renamed = {key.replace("layers.1.", "layers.7."): value for key, value in tensors.items()}
    save_file(renamed, odd / "adapter_model.safetensors")
    with pytest.raises(MergeInputError, match=r"targets module 'model\.layers\.7\.self_attn\.q_proj', which the base"):
        ExpertSet.load(tiny_setup.base_dir, [tiny_setup.adapter_dirs[1], odd])


def test_adapter_shipping_a_different_tokenizer(tiny_setup, tmp_path):
    odd = copy_adapter(tiny_setup.adapter_dirs[0], tmp_path / "odd_tok")
    build_char_tokenizer("zyxwvutsrqponmlkjihgfedcba 0123456789").save_pretrained(odd)
    with pytest.raises(MergeInputError, match="tokenizer's vocabulary differs"):
        ExpertSet.load(tiny_setup.base_dir, [tiny_setup.adapter_dirs[1], odd])
