"""The sweep runner on the tiny fixture: every cell runs, equal budgets, resume skips finished cells."""

import json

import pytest
import yaml

from benchmarks.sweep.config import load_sweep_config
from benchmarks.sweep.report import welch_p
from benchmarks.sweep.config import parse_only
from benchmarks.sweep.runner import run_sweep
from evox_merge.run.config import RacingConfig, SpaceConfig


def sweep_config(setup, tmp_path, methods, seeds=(0, 1)):
    specs = [spec.to_dict() for spec in setup.tasks]
    (tmp_path / "seen.yaml").write_text(yaml.safe_dump(specs[:2]))
    (tmp_path / "unseen.yaml").write_text(yaml.safe_dump(specs[1:]))
    config = {
        "setup": {"base": str(setup.base_dir), "experts": [str(p) for p in setup.adapter_dirs],
                  "seen_tasks": "seen.yaml", "unseen_tasks": "unseen.yaml"},
        "settings": ["single_task_unseen", "multi_task_unseen"],
        "methods": methods,
        "seeds": list(seeds),
        "budgets": {"paper": {"pop_per_expert": 1, "rounds": 2, "iterations": 1},
                    "large": {"pop_per_expert": 1, "rounds": 3, "iterations": 1}},
        "large_budget_settings": ["multi_task_unseen"],
        "max_validation_examples": 6,
        "evogm_params": {"train_steps": 10, "hidden_sizes": [16, 16, 16, 16, 16]},
        "workers": 1,
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_sweep_runs_every_cell_with_equal_budgets_and_resumes(tiny_setup, tmp_path):
    path = sweep_config(tiny_setup, tmp_path, ["base", "dare", "random", "evogm", "evogm_no_cycle"])
    results = run_sweep(path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    # single-task: 2 unseen tasks x (base 1 + dare 2 + 3 searches x 2 seeds); multi-task: (1 + 2 + 6) + large 6
    assert len(rows) == 2 * 9 + 9 + 6
    searches = [r for r in rows if r["evaluations"] is not None]
    assert {r["evaluations"] for r in searches if r["budget"] == "paper"} == {4 * 4}
    assert {r["evaluations"] for r in searches if r["budget"] == "large"} == {4 * 6}
    assert all(r["curve"] == sorted(r["curve"]) and r["validation"] == r["curve"][-1] for r in searches)
    assert all(r["algorithm_seconds"] >= 0 and r["evaluation_seconds"] > 0 for r in searches)
    text = results.read_text()
    assert "## multi_task_unseen, budget `large`" in text and "p (EvoGM vs this)" in text
    assert "| evogm (product) |" in text and "| random (product) |" in text
    assert all(r["selection"] is not None and r["pick"].startswith("record:") for r in searches)
    assert (tmp_path / "out" / "convergence_single_task_unseen_paper.png").stat().st_size > 0
    before = (tmp_path / "out" / "rows.jsonl").read_text()
    run_sweep(path, progress=False)
    assert (tmp_path / "out" / "rows.jsonl").read_text() == before  # nothing reran
    timing = (tmp_path / "out" / "timing.jsonl").read_text().splitlines()
    assert len(timing) == 1 and json.loads(timing[0])["cells"] == len(rows)  # the resume ran nothing, timed nothing
    assert "Cost per run" in results.read_text() and f"{len(rows)} cells in" in results.read_text()
    wider = load_sweep_config(path).model_copy(update={"seeds": [0, 1, 2]})
    partial = run_sweep(wider, progress=False, report_only=True).read_text()
    # seed 2 adds, per single-task group, dare + 3 searches (x2 groups), multi-task dare + 3 searches + 3 large ones
    assert f"{len(rows)} of {len(rows) + 2 * 4 + 4 + 3} cells finished, 15 still to run" in partial
    assert (tmp_path / "out" / "rows.jsonl").read_text() == before  # a report runs nothing


def test_bad_sweep_config_names_the_key(tmp_path):
    import pytest

    from evox_merge.util.errors import MergeInputError

    (tmp_path / "bad.yaml").write_text("methods: [evogm, hillclimb]\nseedz: [1]\n")
    with pytest.raises(MergeInputError, match=r"seedz: unknown key.*|.*hillclimb.*"):
        load_sweep_config(tmp_path / "bad.yaml")


def test_a_device_cuda_lacks_fails_before_any_model_loads_and_rows_record_the_device(tiny_setup, tmp_path,
                                                                                    monkeypatch):
    import torch

    from benchmarks.sweep import runner
    from benchmarks.sweep.report import host_label
    from evox_merge.util.errors import MergeInputError

    path = sweep_config(tiny_setup, tmp_path, ["base"], seeds=(0,))
    if not torch.cuda.is_available():
        monkeypatch.setattr(runner, "load_setup", lambda *_: pytest.fail("loaded the model before checking --device"))
        with pytest.raises(MergeInputError, match=r"--device cuda: .*CUDA is not available"):
            run_sweep(path, progress=False, device="cuda")
        monkeypatch.undo()
    with pytest.raises(MergeInputError, match=r"--device gpu: .*'gpu' is not a device evox-merge runs on"):
        run_sweep(path, progress=False, device="gpu")
    run_sweep(path, progress=False, device="cpu", only={"setting": {"multi_task_unseen"}})
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    assert rows and {row["device"] for row in rows} == {"cpu"}
    assert host_label(rows[0]["host"], rows[0]["device"]) == host_label(rows[0]["host"])  # the CPU: no mention
    assert host_label("Xeon, 16 cores, NVIDIA H200", "cuda") == "16 cores + NVIDIA H200, scored on cuda"


def test_product_takes_whichever_wins_the_selection_part():
    from benchmarks.sweep.report import product_rows

    def row(method, seed, selection, test, evaluations=None):
        return {"setting": "s", "tasks": ["a", "b"], "method": method, "seed": seed, "evaluations": evaluations,
                "selection": selection, "test": test, "test_normalised": test}

    rows = [row("evogm", 0, 0.70, 0.60, 16), row("evogm", 1, 0.50, 0.55, 16), row("task_arithmetic", 0, 0.60, 0.58),
            row("dare", 0, 0.90, 0.40), row("dare", 1, 0.10, 0.10), row("ties", 0, 0.65, 0.99)]
    products = {r["seed"]: r for r in product_rows(rows, ["task_arithmetic", "dare"])}
    assert products[0]["winner"] == "dare" and products[0]["test"] == 0.40  # dare of seed 0 beats the pick
    assert products[1]["winner"] == "task_arithmetic" and products[1]["test"] == 0.58  # ties is not a rival
    assert {r["method"] for r in products.values()} == {"evogm (product)"}


def test_welch_p_value():
    assert welch_p([1.0, 1.1, 0.9, 1.0], [2.0, 2.1, 1.9, 2.0]) < 1e-4
    assert welch_p([1.0, 2.0, 3.0], [1.1, 2.1, 2.9]) > 0.5


def test_grid_restricts_single_task_searches_and_large_budget_methods(tiny_setup, tmp_path):
    import pytest

    from benchmarks.sweep.cells import grid
    from benchmarks.sweep.setup import load_setup
    from evox_merge.util.errors import MergeInputError

    path = sweep_config(tiny_setup, tmp_path, ["base", "random", "evogm"])
    config = load_sweep_config(path).model_copy(update={
        "single_task_tasks": ["copy"], "large_budget_methods": ["evogm"]})
    setup = load_setup(config.setup)
    cells = grid(config, setup)
    assert {c.tasks for c in cells if c.setting == "single_task_unseen"} == {("copy",)}
    assert {c.method for c in cells if c.budget == "large"} == {"evogm"}
    # single-task: base + 2 searches x 2 seeds; multi-task: the same + evogm x 2 seeds at the large budget
    assert len(cells) == 5 + 5 + 2
    with pytest.raises(MergeInputError, match="single_task_tasks: \\['choice'\\] are not unseen"):
        grid(config.model_copy(update={"single_task_tasks": ["choice"]}), setup)


def test_only_runs_a_slice_and_the_rest_resumes(tiny_setup, tmp_path):
    path = sweep_config(tiny_setup, tmp_path, ["base", "random"], seeds=(0,))
    rows_path = tmp_path / "out" / "rows.jsonl"
    results = run_sweep(path, progress=False, only=parse_only(["setting=multi_task_unseen", "method=random"]))
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert {(r["setting"], r["method"]) for r in rows} == {("multi_task_unseen", "random")} and len(rows) == 2
    assert all(r["host"] for r in rows) and "still to run" in results.read_text()
    run_sweep(path, progress=False, workers=2, device="cpu")  # this invocation's overrides
    assert load_sweep_config(tmp_path / "out" / "config.yaml").workers == 1  # the sweep as configured
    timing = [json.loads(line) for line in (tmp_path / "out" / "timing.jsonl").read_text().splitlines()]
    assert [(t["workers"], t["device"]) for t in timing] == [(1, "cpu"), (2, "cpu")]
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert len(rows) == 2 * 2 + 1 + 2 and len({(r["setting"], r["method"], r["budget"], str(r["tasks"])) for r in rows}) == 7
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_only(["colour=red"])


def test_a_raced_sweep_records_the_examples_scored(tiny_setup, tmp_path):
    path = sweep_config(tiny_setup, tmp_path, ["cmaes"], seeds=(0,))
    config = load_sweep_config(path).model_copy(update={"racing": RacingConfig(confidence=0.8)})
    run_sweep(config, progress=False, only=parse_only(["setting=multi_task_unseen", "budget=paper"]))
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0 < rows[0]["examples_fraction"] <= 1
    assert "examples scored" in (tmp_path / "out" / "results.md").read_text()


def test_a_sweep_in_a_layer_space_keeps_the_evaluation_budget(tiny_setup, tmp_path):
    path = sweep_config(tiny_setup, tmp_path, ["evogm"], seeds=(0,))
    config = load_sweep_config(path).model_copy(update={"space": SpaceConfig(kind="layer", groups=2)})
    run_sweep(config, progress=False, only=parse_only(["setting=multi_task_unseen", "budget=paper"]))
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    n = len(tiny_setup.adapter_dirs)
    assert len(rows) == 1 and rows[0]["evaluations"] == 4 * 4 and len(rows[0]["coefficients"]) == 2 * n


def test_the_release_rule_replay_rebuilds_each_contest_exactly(tiny_setup, tmp_path):
    """benchmarks.release_rule on a finished sweep: every run whose pick won is re-scored with per-example parts,
    its margin equals the sweep rows' (the script checks it and raises otherwise), and the report rewrites from
    its rows alone."""
    from benchmarks import release_rule
    from benchmarks.sweep.report import product_rows

    path = sweep_config(tiny_setup, tmp_path, ["task_arithmetic", "best_single", "random", "cmaes"], seeds=(0, 1, 2))
    config = load_sweep_config(path).model_copy(update={"settings": ["multi_task_unseen"],
                                                        "large_budget_settings": []})
    run_sweep(config, progress=False)
    sweep_rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    products = product_rows(sweep_rows, ["task_arithmetic", "best_single"])
    won = [p for p in products if p["winner"] == p["method"].removesuffix(" (product)")]
    assert won, "the fixture must give the replay a contest a search won"
    out = tmp_path / "replay" / "release_rule"
    release_rule.main([str(tmp_path / "out"), "--out", str(out)])
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == len(won)
    for row in rows:
        assert row["margin"]["margin"] == pytest.approx(row["sweep_margin"], abs=1e-6)
        assert row["rule_released"] == ("searched" if row["margin"]["distinguishable"] else "static")
    report = (tmp_path / "replay" / "release_rule.md").read_text()
    assert f"| **all** | {len(products)} | {len(won)} |" in report
    release_rule.main([str(tmp_path / "out"), "--out", str(out), "--report-only"])
    assert (tmp_path / "replay" / "release_rule.md").read_text() == report
