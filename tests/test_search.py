"""End-to-end search runs on the tiny fixture: records, checkpoints, resume after a kill, the release packet."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from evox_merge.cli import main
from evox_merge.run.evaluate import evaluate_model
from evox_merge.run.monitor import read_records
from evox_merge.run.search import run_search

FAST_EVOGM = {"train_steps": 10, "hidden_sizes": [16, 16, 16, 16, 16], "num_rounds": 2, "iterations_per_round": 2}


def search_config(setup, out, **overrides):
    config = {
        "base": str(setup.base_dir),
        "experts": [str(p) for p in setup.adapter_dirs],
        "tasks": [spec.to_dict() for spec in setup.tasks],
        "algorithm": {"name": "evogm", "pop_size": 4, "params": FAST_EVOGM},
        "budget": {"generations": 6},
        "seed": 3,
        "batch_size": 8,
        "output_dir": str(out),
        "intended_use": "tests",
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def finished_run(tiny_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    config = search_config(tiny_setup, out, release={"full_model": True})
    return run_search(config, progress="quiet"), config


def test_search_writes_every_record_and_the_release_packet(finished_run):
    result, config = finished_run
    out = result.output_dir
    records = read_records(out / "records.jsonl")
    assert len(records) == 6 * 4 and [r["id"] for r in records] == list(range(24))
    assert {r["round"] for r in records} == {0, 1} and all("coefficients_round_basis" in r for r in records)
    assert max(r["fitness"] for r in records if r["fitness"] is not None) == result.best_fitness
    for name in ("recipe.json", "README.md", "history.csv", "fitness.png", "coefficients.png", "task_scores.png"):
        assert (out / name).stat().st_size > 0, name
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["best"]["coefficients"] == result.best_coefficients
    assert len(recipe["experts"]) == 4 and all(len(e["sha256"]) == 64 for e in recipe["experts"])
    assert recipe["search"]["evaluations"] == 24 and len(recipe["search"]["algorithm_facts"]["round_bases"]) == 2
    scores = recipe["evaluation"]["scores"]
    assert {"release", "best_searched", "base", "best_single", "task_arithmetic", "ties", "dare"} <= set(scores)
    assert set(scores["release"]) == {"search", "selection", "test"}
    examples = recipe["evaluation"]["examples"]  # per split and task, what the scores were taken on
    assert set(examples) == {"search", "selection", "test"}
    assert set(examples["search"]) == set(recipe["evaluation"]["tasks"])
    assert all(count > 0 for split in examples.values() for count in split.values())
    assert recipe["release"]["name"] in [c["name"] for c in recipe["selection"]["candidates"]]
    margin = recipe["release"]["selection_margin"]  # the release against the other kind's best, with its interval
    by_name = {c["name"]: c for c in recipe["selection"]["candidates"]}
    assert by_name[margin["over"]]["kind"] != by_name[recipe["release"]["name"]]["kind"]
    low, high = margin["ci95"]
    assert low <= margin["margin"] <= high and margin["distinguishable"] == (low > 0)
    assert margin["margin"] == pytest.approx(by_name[recipe["release"]["name"]]["selection_fitness"]
                                             - by_name[margin["over"]]["selection_fitness"], abs=1e-6)
    assert "paired bootstrap interval" in (out / "README.md").read_text()
    searched = set(examples["search"].values())  # the model card says it, beside the learning curve's evidence
    assert len(searched) == 1 and f"The search scored candidates on {searched.pop()} examples per task. On evox" in (
        out / "README.md").read_text()
    oob = margin["out_of_bag"]  # the whole contest rerun on resamples, judged on what each left out
    assert set(oob) == {"gain", "ci95", "searched_won_share", "resamples"} and 0 < oob["resamples"] <= 2000
    # ci95 holds quantiles of the per-resample differences, gain their mean: with most resamples tied at 0 (a search
    # started from the static merges keeps them among its candidates) the mean may lie outside those quantiles
    assert oob["ci95"][0] <= oob["ci95"][1] and 0 <= oob["searched_won_share"] <= 1
    assert "Out of bag (the contest rerun on" in (out / "README.md").read_text()
    assert recipe["normalisation"]["mode"] == "base_best_single"
    kinds = {node["kind"] for node in recipe["lineage"]["nodes"]}
    assert kinds == {"expert", "basis vector", "release"}
    assert "Intended use:** tests" in (out / "README.md").read_text()


def test_the_release_rule_is_recorded_and_an_override_is_told_plainly(finished_run):
    from types import SimpleNamespace

    from evox_merge.cli import _summary_table
    from evox_merge.run.report import model_card

    result, _ = finished_run
    recipe = json.loads((result.output_dir / "recipe.json").read_text())
    release = recipe["release"]
    assert release["rule"] == "best" and release["contest_winner"] == release["name"]
    assert release["rule_overrode"] is False
    # every contestant scoring exactly what the winner scored on the selection part is named (ties go to statics)
    scored = {c["name"]: c["selection_fitness"] for c in recipe["selection"]["candidates"]}
    assert sorted(release["tied_with"]) == sorted(n for n, f in scored.items()
                                                  if f == scored[release["name"]] and n != release["name"])
    # how a run under `release.rule: significant` reads when its searched winner did not win clearly
    margin = {**release["selection_margin"], "over": "task_arithmetic", "distinguishable": False}
    release.update(name="task_arithmetic", kind="static", static_merge_won=True, rule="significant",
                   contest_winner="record:7", rule_overrode=True, selection_margin=margin)
    card = model_card(recipe)
    assert "The release is the static merge `task_arithmetic`: the searched candidate `record:7` won" in card
    assert "`record:7` beat task_arithmetic on the selection part" in card and "within noise" in card
    summary = _summary_table(SimpleNamespace(output_dir=result.output_dir, scores=result.scores, recipe=recipe,
                                             release="task_arithmetic"))
    assert "Released: task_arithmetic (a static merge: record:7 won the selection, not clearly (rule significant))" \
        in summary
    assert "record:7 beat task_arithmetic" in summary


def test_mean_objective_packet_is_unchanged_and_records_carry_evidence(finished_run, capsys):
    from evox_merge.run.evidence import RUN_EVIDENCE_FIELDS, full_record
    from evox_merge.run.monitor import EVIDENCE_FIELDS

    result, _ = finished_run
    out = result.output_dir
    for name in ("champion", "specialists", "challengers", "pareto_front.png"):
        assert not (out / name).exists(), name
    header = (out / "history.csv").read_text().splitlines()[0]
    assert header == "id,generation,round,fitness,choice,copy,text," + ",".join(f"c_expert_{i}" for i in range(4))
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["release_files"]["adapter"] == "best/adapter" and "pareto" not in recipe
    run = json.loads((out / "run.json").read_text())
    records = read_records(out / "records.jsonl")
    for record in records:
        assert set(EVIDENCE_FIELDS) <= set(record) and "objectives" not in record
        assert set(RUN_EVIDENCE_FIELDS) <= set(full_record(record, run))
    # EvoGM knows its parents: round 0's initial population comes from the experts, later ones from records.
    assert records[0]["parents"] == [f"expert:expert_{i}" for i in range(4)]
    assert all(p.startswith("record:") for p in records[-1]["parents"])
    assert main(["lineage", str(out)]) == 0
    assert "expert:" in capsys.readouterr().out


def test_released_adapter_and_model_reproduce_the_recorded_scores(finished_run, tiny_setup, tmp_path):
    result, _ = finished_run
    spec_file = tmp_path / "tasks.yaml"
    spec_file.write_text(yaml.safe_dump([spec.to_dict() for spec in tiny_setup.tasks]))
    recorded = result.scores["release"]["test"]
    adapter_scores = evaluate_model(tiny_setup.base_dir, spec_file, adapter=result.output_dir / "best" / "adapter",
                                    split="test")
    model_scores = evaluate_model(result.output_dir / "best" / "model", spec_file, split="test")
    for name in ("choice", "copy", "text"):
        assert adapter_scores[name] == pytest.approx(recorded[name], abs=1e-5)
        assert model_scores[name] == pytest.approx(recorded[name], abs=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_setup.base_dir)
    assert isinstance(PeftModel.from_pretrained(base, result.output_dir / "best" / "adapter"), PeftModel)


def test_non_empty_output_is_refused_without_resume_or_overwrite(finished_run, tiny_setup, capsys):
    result, config = finished_run
    path = result.output_dir.parent / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["search", str(path), "--quiet"]) == 2
    assert "is not empty: pass --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_best(tiny_setup, tmp_path):
    """Kill a CLI search with SIGKILL after its 3rd checkpoint; --resume must end where an uninterrupted run does."""
    config = search_config(tiny_setup, tmp_path / "killed", release={"baselines": False})
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen([sys.executable, "-m", "evox_merge.cli", "search", str(config_path), "--quiet"],
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=False)["counters"]["generation"] >= 3:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "recipe.json").exists()
    resumed = run_search(config_path, resume=True, progress="quiet")

    straight = run_search(search_config(tiny_setup, tmp_path / "straight", release={"baselines": False}),
                          progress="quiet")
    assert resumed.best_coefficients == straight.best_coefficients
    assert resumed.best_fitness == straight.best_fitness
    killed_records = read_records(tmp_path / "killed" / "records.jsonl")
    straight_records = read_records(tmp_path / "straight" / "records.jsonl")
    assert [r["coefficients"] for r in killed_records] == [r["coefficients"] for r in straight_records]
