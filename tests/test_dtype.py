"""dtype: auto resolves to the dtype a run uses and is recorded; the in-place merge, the rows path and every scorer
run in bfloat16 on the CPU, and their scores stay within a bound of float32's that follows from bfloat16's precision.
"""

import json

import pytest
import torch

from evox_merge.experts import ExpertSet
from evox_merge.experts.merger import shared_merger
from evox_merge.problems.merge_problem import MergeProblem
from evox_merge.run.config import SearchConfig, resolve_dtype
from evox_merge.tasks import read_task
from evox_merge.tasks.scorers import build_scorer
from tests.test_search import search_config

UNIT_ROUNDOFF = 2.0 ** -8  # bfloat16 keeps 8 significant bits: a rounding's relative error is at most 2**-8


def test_auto_is_bfloat16_on_a_gpu_that_has_it_and_float32_elsewhere(monkeypatch):
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("float16", "cpu") == "float16" and resolve_dtype("bfloat16", "cuda") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_dtype("auto", "cuda:0") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_dtype("auto", "cuda") == "float32"


def test_the_validated_config_holds_the_dtype_the_run_uses(tiny_setup, tmp_path):
    config = search_config(tiny_setup, tmp_path / "out")
    assert "dtype" not in config and SearchConfig(**config).dtype == "float32"  # the default, auto, on the CPU
    assert SearchConfig(**config, dtype="auto").model_dump()["dtype"] == "float32"
    assert SearchConfig(**config, dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        SearchConfig(**config, dtype="float64")


@pytest.mark.slow
def test_a_bfloat16_search_on_the_cpu_runs_and_records_its_dtype(tiny_setup, tmp_path):
    from evox_merge.run.search import run_search

    out = tmp_path / "out"
    config = search_config(tiny_setup, out, dtype="bfloat16", algorithm={"name": "random", "pop_size": 4},
                           budget={"generations": 2})
    result = run_search(config, progress="quiet")
    run = json.loads((out / "run.json").read_text())
    recipe = json.loads((out / "recipe.json").read_text())
    assert run["config"]["dtype"] == "bfloat16" and run["evidence"]["resource_profile"]["dtype"] == "bfloat16"
    assert recipe["resources"]["dtype"] == "bfloat16"
    assert result.best_fitness == result.best_fitness  # not NaN: every task scored in bfloat16
    for split in result.scores["release"].values():
        assert all(value == value for value in split.values())


def per_token_bound(model, layers: int) -> float:
    """How far bfloat16 may move one token's log-probability from float32's, to first order: each of the model's
    ``layers`` blocks, the embedding and the output layer rounds values that RMSNorm keeps at the logits' scale
    ``s = max(1, max |logit|)``, each adding at most ``u * s`` to a logit's error (u = 2**-8); a log-probability is
    a logit minus a logsumexp over logits, which doubles it: ``2 (layers + 2) u s``. It assumes merges that keep
    the model near its scale (coefficients in the default search box [-1, 1]): a merge that blows a layer up
    amplifies rounding errors past it (this fixture's expert 3 at coefficient 3 moves a token by 0.044)."""
    with torch.no_grad():
        scale = max(1.0, float(model(input_ids=torch.arange(32).unsqueeze(0)).logits.abs().max()))
    return 2 * (layers + 2) * UNIT_ROUNDOFF * scale


@pytest.fixture(scope="module")
def both_dtypes(tiny_setup):
    """The fixture's experts loaded in float32 and in bfloat16, and 8 candidates in the default search box
    [-1, 1]: the base, each expert alone, and 3 random mixes."""
    experts = {dtype: ExpertSet.load(tiny_setup.base_dir, tiny_setup.adapter_dirs, dtype=dtype)
               for dtype in (torch.float32, torch.bfloat16)}
    generator = torch.Generator().manual_seed(0)
    population = torch.cat([torch.zeros(1, 4), torch.eye(4), 2 * torch.rand(3, 4, generator=generator) - 1])
    return experts, population


def test_bfloat16_scores_stay_within_the_precision_bound_of_float32(tiny_setup, both_dtypes):
    experts, population = both_dtypes
    full, half = experts[torch.float32], experts[torch.bfloat16]
    assert half.dtype_name == "bfloat16" and all(f.A_cat.dtype == torch.bfloat16 for f in half.layers.values())
    bound = per_token_bound(full.model, full.model.config.num_hidden_layers)
    choice_task, _, text_task = (read_task(spec) for spec in tiny_setup.tasks)
    lm_scores = {}
    worst = {"choice": 0.0, "text": 0.0}
    for dtype, expert_set in experts.items():
        choice = build_scorer(choice_task, expert_set.tokenizer, 8, "cpu")
        text = build_scorer(text_task, expert_set.tokenizer, 8, "cpu")
        merger = shared_merger(expert_set)
        rows = []
        for candidate in population:
            with merger.merged(candidate):
                rows.append((choice.choice_logprobs(expert_set.model), *text.row_logprobs(expert_set.model)))
        lm_scores[dtype] = rows
    choice_tokens = torch.tensor([[len(full.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in
                                   r["choices"]] for r in choice_task.records], dtype=torch.float64)
    for (mc32, sums32, counts), (mc16, sums16, _) in zip(lm_scores[torch.float32], lm_scores[torch.bfloat16]):
        # Language modelling: each text's mean per-token log-probability within the per-token bound.
        per_token = ((sums32 - sums16).abs() / counts)[0]
        assert per_token.max() <= bound
        worst["text"] = max(worst["text"], float(per_token.max()))
        # Multiple choice: each choice's summed log-probability within the bound times its tokens.
        change = (mc32 - mc16).abs()
        assert (change <= bound * choice_tokens).all()
        worst["choice"] = max(worst["choice"], float((change / choice_tokens).max()))
    # bfloat16 tells the candidates apart as float32 does: its changes (at most the bound) are small against the
    # spread of the candidates' scores, so the two dtypes' language-modelling scores correlate almost perfectly
    # (a merge lost or mixed up in bfloat16 would not).
    score = {dtype: torch.stack([s[0].sum() / c.sum() for _, s, c in rows]) for dtype, rows in lm_scores.items()}
    moved = (score[torch.float32] - score[torch.bfloat16]).abs()
    correlation = torch.corrcoef(torch.stack([score[torch.float32], score[torch.bfloat16]]))[0, 1]
    print(f"bf16 vs fp32 on {len(population)} candidates: per-token bound {bound:.4f}, worst per-token change "
          f"{worst['text']:.2e} (texts) and {worst['choice']:.2e} (choices); LM score change <= {moved.max():.2e} "
          f"against a spread (std) of {score[torch.float32].std():.2e} across candidates, correlation "
          f"{correlation:.5f}")
    assert moved.max() <= bound and correlation > 0.99


def test_bfloat16_rows_path_stays_within_the_bound_of_the_float32_merge(tiny_setup, both_dtypes):
    """Several candidates per pass (factors unmerged, bfloat16 activations) against float32's in-place merge."""
    experts, population = both_dtypes
    bound = per_token_bound(experts[torch.float32].model, experts[torch.float32].model.config.num_hidden_layers)
    tasks = [tiny_setup.tasks[2]]  # language modelling: a mean per token, the bound applies to it directly
    reference = MergeProblem(experts[torch.float32], tasks, batch_size=8).evaluate_per_task(population)
    rows = MergeProblem(experts[torch.bfloat16], tasks, batch_size=8, candidates_per_pass=4)
    assert (rows.evaluate_per_task(population) - reference).abs().max() <= bound
