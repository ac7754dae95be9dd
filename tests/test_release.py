"""The released PEFT adapter: exact concatenation of the merged factors, or SVD-compressed with an honest error."""

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evox_merge.experts.kernel import merged_delta
from evox_merge.run.release import write_lora_adapter

COEFFICIENTS = torch.tensor([0.7, -0.4, 0.5, 0.3])


def _adapter_deltas(path) -> dict[str, torch.Tensor]:
    """Each layer's B @ A from the written adapter (alpha = r: scaling 1)."""
    tensors = load_file(str(path / "adapter_model.safetensors"))
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    return {
        key[len(prefix):-len(suffix)]: tensors[key.replace("lora_A", "lora_B")].double() @ tensors[key].double()
        for key in tensors if key.endswith(suffix)
    }


def test_exact_adapter_holds_the_merged_delta(tiny_experts, tmp_path):
    info = write_lora_adapter(tiny_experts, COEFFICIENTS, tmp_path / "exact")
    deltas = _adapter_deltas(tmp_path / "exact")
    assert info["exact"] and info["max_relative_error"] == 0.0 and set(deltas) == set(tiny_experts.layers)
    for name, layer in tiny_experts.layers.items():
        torch.testing.assert_close(deltas[name], merged_delta(layer, COEFFICIENTS).double(), atol=1e-6, rtol=1e-5)
        assert info["ranks"][name] == layer.A_cat.shape[0]


def test_compressed_adapter_is_the_best_rank_k_approximation_with_its_true_error(tiny_experts, tmp_path):
    rank = 2
    info = write_lora_adapter(tiny_experts, COEFFICIENTS, tmp_path / "svd", rank=rank)
    deltas = _adapter_deltas(tmp_path / "svd")
    assert not info["exact"]
    errors = []
    for name, layer in tiny_experts.layers.items():
        dense = merged_delta(layer, COEFFICIENTS).double()
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]  # Eckart-Young: the best rank-2 approximation
        torch.testing.assert_close(deltas[name], best, atol=1e-5, rtol=1e-4)
        true_error = float(torch.linalg.norm(dense - best) / torch.linalg.norm(dense))
        assert info["relative_errors"][name] == pytest.approx(true_error, abs=1e-6)
        assert info["ranks"][name] == min(rank, layer.A_cat.shape[0])
        errors.append(true_error)
    assert info["max_relative_error"] == pytest.approx(max(errors)) and max(errors) > 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_experts.base_path), tmp_path / "svd")
    assert isinstance(model, PeftModel)


def test_a_rank_at_least_the_stacked_rank_loses_nothing(tiny_experts, tmp_path):
    full = max(layer.A_cat.shape[0] for layer in tiny_experts.layers.values())
    info = write_lora_adapter(tiny_experts, COEFFICIENTS, tmp_path / "wide", rank=full)
    assert info["max_relative_error"] < 1e-6
    deltas = _adapter_deltas(tmp_path / "wide")
    for name, layer in tiny_experts.layers.items():
        torch.testing.assert_close(deltas[name], merged_delta(layer, COEFFICIENTS).double(), atol=1e-5, rtol=1e-4)
