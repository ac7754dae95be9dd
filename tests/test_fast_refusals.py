"""Bad inputs that the files can answer are refused before torch, transformers or EvoX are imported, and the
torch-free rules those refusals use (`evox_merge.algorithms.limits`, the static merges' names, the constructors'
defaults read with `ast`) agree with the code they stand for."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from error_cases_runs import HOLD_LOCK, _started_run_with_evidence
from error_harness import Workspace, tree
from evox_merge.algorithms import limits
from evox_merge.run import registry
from evox_merge.run.config import constructor_defaults, constructor_parameters

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "evox", "peft", "scipy", "matplotlib")

# Runs each command in one fresh interpreter, one after the other, and reports per command its exit status, the
# heavy modules imported so far and the last line of its error output.
DRIVER = """
import contextlib, io, json, sys
from evox_merge.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exit:
            rc = exit.code
    lines = err.getvalue().strip().splitlines()
    results.append([rc, [m for m in HEAVY if m in sys.modules], lines[-1] if lines else ""])
print(json.dumps(results))
"""


def run_fresh(commands: list[list[str]], cwd: Path) -> list[tuple[int, list[str], str]]:
    """Each command's (exit status, heavy modules imported by then, last error line), in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    code = f"HEAVY = {HEAVY!r}\n" + DRIVER
    out = subprocess.run([sys.executable, "-c", code, json.dumps(commands)], capture_output=True, text=True,
                         timeout=120, cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr
    return [tuple(result) for result in json.loads(out.stdout)]


def _config(ws: Workspace, name: str, **overrides) -> str:
    path = ws.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(ws.config(**overrides)))
    return str(path)


def test_bad_inputs_fail_fast_without_heavy_imports(tiny_setup, tmp_path):
    """Several bad inputs of each command (search CONFIG, search --zoo, evaluate, bench) exit with status 2 and a
    message before any heavy module is imported; `algorithms` lists without one. Timing is measured by hand
    (a config-only error takes about 0.2 s, against 5-10 s with the imports)."""
    ws = Workspace(tmp_path, tiny_setup)
    one = ws.root / "data" / "one.jsonl"
    one.write_text((ws.root / "data" / "copy_validation.jsonl").read_text().splitlines()[0] + "\n")
    empty = ws.root / "data" / "empty.jsonl"
    empty.write_text((ws.root / "data" / "choice_validation.jsonl").read_text()
                     + json.dumps({"prompt": "", "choices": ["a", "b"], "answer": 0}) + "\n")
    (ws.root / "sweep_bad.yaml").write_text("methods: [nope]\n")
    (ws.root / "sweep_seed.yaml").write_text("seeds: [-1]\n")
    (ws.root / "sweep_evogm.yaml").write_text("evogm_params: {train_steps: 0}\n")
    (ws.root / "sweep_ok.yaml").write_text(f"setup: {{zoo_dir: {ws.root / 'zoo'}, zoo_preset: micro}}\n")
    search = [
        (_config(ws, "cmaes", algorithm={"name": "cmaes", "pop_size": 1}), r"cmaes needs at least 2"),
        (_config(ws, "nsga2", algorithm={"name": "nsga2", "pop_size": 1}, objectives="pareto"),
         r"nsga2 needs at least 2"),
        (_config(ws, "evogm", algorithm={"name": "evogm", "pop_size": 1}), r"evogm needs at least 2"),
        (_config(ws, "moead", algorithm={"name": "moead", "pop_size": 8}, objectives="pareto"), r"MOEA/D turns"),
        (_config(ws, "seed", seed=2 ** 64), r"seed: expected an integer from 0 to 2\*\*64 - 1"),
        (_config(ws, "mps", device="mps"), r"device: 'mps' is not a device"),
        (_config(ws, "meta", device="meta"), r"device: 'meta' is not a device"),
        (_config(ws, "pdevice", algorithm={"name": "pso", "params": {"device": "cpu"}}), r"params\.device: set by"),
        (_config(ws, "sigma", algorithm={"name": "cmaes", "params": {"sigma": -1}}), r"params\.sigma: expected"),
        (_config(ws, "mean", algorithm={"name": "cmaes", "params": {"mean_init": [0.5]}}), r"mean_init: expected 3"),
        (_config(ws, "ub", algorithm={"name": "random", "ub": float("inf")}), r"algorithm\.ub: .*finite"),
        (_config(ws, "lbub", algorithm={"name": "random", "lb": 1.0, "ub": 1.0}), r"lb \(1\.0\) must be below"),
        (_config(ws, "basis", algorithm={"name": "evogm", "pop_size": 2, "params": {"iterations_per_round": 1}},
                 space={"kind": "layer", "groups": 2}), r"basis shift"),
        (_config(ws, "split", tasks=[ws.task("copy", path="data/one.jsonl")]), r"one\.jsonl holds 1 example"),
        (_config(ws, "prompt", tasks=[ws.task("choice", path="data/empty.jsonl")]),
         r"empty\.jsonl:13: the prompt is empty"),
    ]
    zoo = [
        (["search", "--zoo", "--preset", "huge"], r"unknown zoo preset 'huge'"),
        (["search", "--zoo", "--preset", "micro", "--zoo-dir", str(one)], r"--zoo-dir: .* is a file"),
        (["search", "--zoo", "--preset", "micro", "--zoo-dir", str(ws.root / "data")], r"holds no zoo"),
        (["search", "--zoo", "--seed", "-2", "--zoo-dir", str(ws.root / "zoo")], r"--seed: expected an integer"),
        (["search", "--zoo", "--out", str(one)], r"--out: .* is a file"),
        (["search", _config(ws, "good"), "--preset", "micro"], r"--preset: only with --zoo"),
    ]
    evaluate = [
        (["evaluate", "--model", str(ws.root / "base"), "--tasks", str(ws.root / "nope.yaml")], r"does not exist"),
        (["evaluate", "--model", str(ws.root / "base"), "--tasks", str(ws.tasks_file()), "--batch-size", "0"],
         r"--batch-size: must be an integer >= 1"),
        (["evaluate", "--model", str(ws.root / "gone"), "--tasks", str(ws.tasks_file())], r"--model: .*gone"),
        (["evaluate", "--model", str(ws.root / "base")], r"required: --tasks"),
    ]
    bench = [
        (["bench", str(ws.root / "sweep_missing.yaml")], r"sweep config .* does not exist"),
        (["bench", str(ws.root / "sweep_bad.yaml")], r"unknown method\(s\) \['nope'\]"),
        (["bench", str(ws.root / "sweep_seed.yaml")], r"seeds: expected an integer from 0"),
        (["bench", str(ws.root / "sweep_evogm.yaml")], r"evogm_params\.train_steps: expected an integer >= 1"),
        (["bench", str(ws.root / "sweep_ok.yaml"), "--only", "colour=red"], r"--only 'colour=red'"),
        (["bench", str(ws.root / "sweep_ok.yaml"), "--workers", "0"], r"--workers: must be an integer >= 1"),
        (["bench", str(ws.root / "sweep_ok.yaml"), "--device", "mps"], r"--device mps: .*not a device"),
    ]
    cases = [(["search", path, "--quiet"], message) for path, message in search] + zoo + evaluate + bench
    results = run_fresh([argv for argv, _ in cases] + [["algorithms"]], ws.root)
    for (argv, message), (rc, heavy, error) in zip(cases, results):
        assert rc == 2 and not heavy, (argv, rc, heavy, error)
        assert re.search(message, error), (argv, error)
    assert results[-1][:2] == (0, [])
    assert not (ws.root / "zoo").exists() and not (ws.root / "out").exists()


def test_bad_experts_and_outputs_fail_fast_without_heavy_imports(tiny_setup, tmp_path):
    """Refusals from an expert's files (listed twice, a copy of another, a key twice in adapter_config.json, a rank
    other than the config's, every lora_B zero), a folder given as a task spec file, and outputs that cannot be
    written (under a regular file) for every command: exit status 2 before any heavy import. Measured by hand: a
    config-only refusal of an expert takes 0.7-0.8 s (`time evox-merge search bad.yaml`), against about 6 s when
    these checks came after the imports."""
    ws = Workspace(tmp_path, tiny_setup)
    for name in ("copy_1", "rank_8", "key_twice", "untrained"):
        shutil.copytree(ws.root / ("expert_1" if name == "copy_1" else "expert_0"), ws.root / name)
    config = ws.root / "rank_8" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": 8}))
    config = ws.root / "key_twice" / "adapter_config.json"
    config.write_text(config.read_text().rstrip()[:-1] + ', "r": 99}')
    ws.edit_tensors("untrained", lambda tensors: [tensors[k].zero_() for k in tensors if "lora_B" in k])
    (ws.root / "afile").write_text("hi\n")
    afile, run = ws.root / "afile", ws.start_run(output_dir="run")
    search = [
        (_config(ws, "twice", experts=["expert_0", "expert_1", "expert_0"]), r"experts\[2\]: .* is experts\[0\] again"),
        (_config(ws, "copy", experts=["expert_0", "expert_1", "copy_1"]), r"holds the same weights"),
        (_config(ws, "key", experts=["expert_0", "key_twice"]), r"gives the key 'r' twice"),
        (_config(ws, "rank", experts=["rank_8", "expert_1"]), r"\(rank 4\) but .* gives this module r = 8"),
        (_config(ws, "untrained", experts=["untrained", "expert_1"]), r"every module's lora_B \(or lora_A\) is all "),
        (_config(ws, "tasks", tasks="data"), r"tasks: .*data is a directory; expected a task spec file"),
        (_config(ws, "under", output_dir="afile/run"), r"output_dir: .*afile/run lies under .*afile, which is a file"),
    ]
    two = ["--base", str(ws.root / "base"), "--coefficients", "0.5,0.5"]
    others = [
        (["evaluate", "--model", str(ws.root / "base"), "--tasks", str(ws.root / "data")], r"--tasks: .* is a dir"),
        (["evaluate", "--model", str(ws.root / "base"), "--tasks", str(ws.tasks_file()), "--adapter",
          str(ws.root / "rank_8")], r"--adapter: .*rank_8/adapter_model\.safetensors: tensor"),
        (["apply", *two, "--experts", str(ws.root / "expert_0"), str(ws.root / "untrained"), "--out",
          str(ws.root / "merged")], r"experts\[1\]: .*untrained/adapter_model\.safetensors: every module"),
        (["apply", *two, "--experts", str(ws.root / "expert_0"), str(ws.root / "expert_1"), "--out",
          str(afile / "m")], r"--out: .*afile/m lies under .*afile, which is a file"),
        (["zoo", "build", "--out", str(afile / "zoo"), "--preset", "micro"], r"--out: .*afile/zoo lies under"),
        (["search", "--zoo", "--preset", "micro", "--zoo-dir", str(afile / "zoo")], r"--zoo-dir: .*afile/zoo lies"),
        (["search", "--zoo", "--preset", "micro", "--zoo-dir", str(ws.root / "zoo"), "--out", str(afile / "run")],
         r"--out: .*afile/run lies under"),
        (["lineage", str(run), "--out", str(afile / "l.dot")], r"--out: .*afile/l\.dot lies under"),
    ]
    cases = [(["search", path, "--quiet"], message) for path, message in search] + others
    before = tree(ws.root)
    results = run_fresh([argv for argv, _ in cases], ws.root)
    assert tree(ws.root) == before and not (ws.root / "zoo").exists()
    for (argv, message), (rc, heavy, error) in zip(cases, results):
        assert rc == 2 and not heavy, (argv, rc, heavy, error)
        assert re.search(message, error), (argv, error)


def test_refused_output_folders_fail_fast_without_heavy_imports(tiny_setup, tmp_path):
    """A search refused for its output folder exits with status 2 before any heavy module is imported and changes
    no file: a user's folder (no flag, --overwrite, --resume), a run resumed with a changed config or a changed
    expert, --overwrite of a run that holds a file the config reads, a folder another search holds, an output_dir
    under a regular file. Measured by hand: about 0.25 s each, against 6-10 s when the imports came first."""
    ws = Workspace(tmp_path, tiny_setup)
    _started_run_with_evidence(ws)  # out/: run.json with the models' hashes, a checkpoint, its 4 records
    resumed = _config(ws, "resumed")
    ws.edit_tensors("expert_1", lambda tensors: tensors.update({k: v * 2 for k, v in tensors.items()}))
    (ws.root / "mine").mkdir()
    (ws.root / "mine" / "notes.txt").write_text("the user's")
    inside = ws.start_run(output_dir="inside")
    (inside / "best").mkdir()
    shutil.copy(ws.root / "data" / "copy_validation.jsonl", inside / "best" / "copy.jsonl")
    (ws.root / "notes.txt").write_text("the user's notes")
    (ws.root / "locked").mkdir()
    mine = _config(ws, "mine", output_dir="mine")
    cases = [
        ([mine], r"output directory .*/mine is not empty: pass --resume to continue its run or --overwrite"),
        ([mine, "--overwrite"], r"--overwrite refused: .*/mine holds no previous run \(run\.json missing\) but 1"),
        ([mine, "--resume"], r"--resume: .*/mine holds no run to resume \(run\.json missing\)"),
        ([_config(ws, "seed", seed=7), "--resume"], r"--resume: the config differs from the run's in \['seed'\]"),
        ([resumed, "--resume"], r"--resume refused: experts\[1\] .*/expert_1 changed since the run started"),
        ([_config(ws, "inside", output_dir="inside", tasks=[ws.task("copy", path="inside/best/copy.jsonl")]),
          "--overwrite"], r"--overwrite refused: the config reads \[.*/inside/best/copy\.jsonl'\], inside the"),
        ([_config(ws, "locked", output_dir="locked")], r"output_dir: .*/locked is in use by another search \(pid \d+"),
        ([_config(ws, "under", output_dir="notes.txt/run")],
         r"output_dir: .*/notes\.txt/run lies under .*/notes\.txt, which is a file; expected a directory"),
    ]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ws.root / "locked" / "run.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(ws.root)
        results = run_fresh([["search", *argv, "--quiet"] for argv, _ in cases], ws.root)
        assert tree(ws.root) == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    for (argv, message), (rc, heavy, error) in zip(cases, results):
        assert rc == 2 and not heavy, (argv, rc, heavy, error)
        assert re.search(message, error), (argv, error)


def test_uniform_weight_count_matches_evox():
    from evox.operators.sampling import uniform_sampling

    for m in (2, 3, 4):
        for n in range(1, 40):
            assert limits.uniform_weight_count(n, m) == uniform_sampling(n, m)[1], (n, m)


def test_torch_free_tables_agree_with_the_code():
    from evox_merge.algorithms.evogm_variants import VARIANTS
    from evox_merge.problems.static_merges import STATIC_MERGES
    from evox_merge.problems.static_names import STATIC_MERGE_NAMES

    assert limits.EVOGM_VARIANTS == tuple(sorted(VARIANTS))
    assert STATIC_MERGE_NAMES == tuple(STATIC_MERGES)
    classes = {entry.class_name: name for name, entry in registry.ALGORITHMS.items()}
    for class_name, rules in limits.RULES.items():
        _, accepted, _ = constructor_parameters(classes[class_name])
        assert set(rules) <= accepted, class_name
    assert set(limits.MIN_POP_SIZE) <= set(classes)
    for name, entry in registry.ALGORITHMS.items():  # the defaults read from the source are inspect's
        parameters = inspect.signature(entry.load().__init__).parameters
        expected = {key: p.default for key, p in parameters.items() if p.default is not inspect.Parameter.empty}
        found = constructor_defaults(name)
        assert found == {key: value for key, value in expected.items() if key in found}, name
        assert {"pop_size", "lb", "ub", "seed"} <= set(found), name


@pytest.mark.parametrize("name, pop_size, params, n_objs", [
    ("cmaes", 1, {}, None), ("cmaes", 4, {"sigma": -1.0}, None), ("cmaes", 4, {"boundary": "wrap"}, None),
    ("nsga2", 1, {}, 2), ("hype", 1, {}, 2), ("hype", 4, {"n_sample": 0}, 2), ("moead", 10, {}, 2),
    ("moead", 12, {}, 3), ("rvea", 4, {"fr": 0.0}, 2), ("pso", 4, {"init": "gauss"}, None),
    ("evogm", 1, {}, None), ("evogm", 4, {"train_steps": 0}, None), ("evogm", 4, {"variant": "fancy"}, None),
    ("evogm", 4, {"extrapolation": 0.5}, None),
])
def test_the_classes_refuse_what_the_config_refuses(name, pop_size, params, n_objs):
    """Each value the torch-free rules refuse, the algorithm refuses too with a MergeInputError naming it (and a
    value they pass, it takes): one rule, two places it is applied."""
    from evox_merge.util.errors import MergeInputError

    problems = registry.argument_problems(name, pop_size, params, n_objs)
    assert problems
    key = next(iter(params), "pop_size")
    with pytest.raises(MergeInputError, match=key):
        registry.build_algorithm(name, 3, pop_size=pop_size, params=params, n_objs=n_objs)
    smallest = next(size for size in range(1, 100) if not registry.argument_problems(name, size, {}, n_objs))
    registry.build_algorithm(name, 3, pop_size=smallest, n_objs=n_objs)
    if smallest > 1:  # the boundary is the class's own
        with pytest.raises(MergeInputError, match="pop_size"):
            registry.build_algorithm(name, 3, pop_size=smallest - 1, n_objs=n_objs)
