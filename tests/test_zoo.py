"""The offline zoo, on its `micro` preset (a real build in seconds): determinism, caching, partial builds, bad
input, and that its files load with the ecosystem's own loaders."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import evox_merge.zoo.build as zoo_build
from evox_merge.util.errors import ZooError
from evox_merge.util.ownership import STAGING_MARKER
from evox_merge.experts import ExpertSet
from evox_merge.tasks import load_task_specs, read_task
from evox_merge.zoo import PRESETS, build_zoo, default_zoo_dir, load_zoo
from evox_merge.zoo.families import FAMILIES
from evox_merge.zoo.task_suite import near_misses


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory) -> Path:
    """A micro zoo built once for the session (tests that damage a zoo copy it first)."""
    return build_zoo(tmp_path_factory.mktemp("zoo") / "micro", preset="micro", seed=0, progress=False)


@pytest.fixture
def zoo_copy(micro_zoo, tmp_path) -> Path:
    """A private copy of the micro zoo that a test may damage."""
    return Path(shutil.copytree(micro_zoo, tmp_path / "micro-seed0"))


def test_layout_and_manifest(micro_zoo):
    zoo = load_zoo(micro_zoo)
    assert zoo.expert_names == list(FAMILIES) and len(FAMILIES) >= 8
    assert all((d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
               for d in zoo.adapter_dirs)
    assert (zoo.base_dir / "model.safetensors").is_file() and (zoo.base_dir / "tokenizer.json").is_file()
    manifest = zoo.manifest
    assert (manifest["preset"], manifest["seed"]) == ("micro", 0)
    assert manifest["settings"]["base_steps"] == PRESETS["micro"].base_steps
    listed = set(manifest["files"])
    on_disk = {p.relative_to(micro_zoo).as_posix() for p in micro_zoo.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk
    scores = manifest["validation_scores"]
    assert set(scores) == {"base", *zoo.expert_names}
    assert all(set(row) == {t.name for t in zoo.tasks} and all(0 <= v <= 1 for v in row.values())
               for row in scores.values())


def test_tasks_are_loadable_disjoint_and_mixed(micro_zoo):
    zoo = load_zoo(micro_zoo)
    preset = PRESETS["micro"]
    assert [t.name for t in zoo.seen_tasks] == zoo.expert_names
    assert len(zoo.unseen_tasks) >= 8
    assert {t.type for t in zoo.seen_tasks} == {t.type for t in zoo.unseen_tasks} == {"generation", "multiple_choice"}
    assert [t.name for t in load_task_specs(micro_zoo / "tasks.json")] == [t.name for t in zoo.tasks]
    for spec in zoo.tasks:
        validation = read_task(spec).records
        test = read_task(spec.with_split("test")).records
        assert (len(validation), len(test)) == (preset.validation_size, preset.test_size)
        assert len(test) >= 5 * len(validation)
        assert not {r["prompt"] for r in validation} & {r["prompt"] for r in test}
        assert Path(spec.path).is_relative_to(micro_zoo)
    seen_prompts = {r["prompt"] for spec in zoo.seen_tasks for r in read_task(spec).records}
    assert all(p.endswith("=") for p in seen_prompts)


def test_near_misses_are_close_and_never_the_answer():
    assert near_misses("abc") == sorted({"bac", "acb", "zbc", "bbc", "aac", "acc", "abb", "abd"})
    assert near_misses("ABC")[0].isupper()
    assert near_misses("5") == ["0", "1", "2", "3", "4", "6", "7", "8", "9", "10"]
    assert near_misses("0") == ["1", "2", "3", "4", "5"]


def test_files_load_with_transformers_and_peft(micro_zoo):
    zoo = load_zoo(micro_zoo)
    tokenizer = AutoTokenizer.from_pretrained(zoo.tokenizer_dir)
    assert isinstance(tokenizer, PreTrainedTokenizerFast) and len(tokenizer) < 100
    assert tokenizer.decode(tokenizer("rev:abc=")["input_ids"]) == "rev:abc="
    base = AutoModelForCausalLM.from_pretrained(zoo.base_dir)
    assert base.config.model_type == "qwen2"
    ids = tokenizer("rev:abc=", return_tensors="pt")["input_ids"]
    base_logits = base(ids).logits
    configs = []
    for adapter_dir in zoo.adapter_dirs:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo.base_dir), adapter_dir)
        assert not torch.equal(model(ids).logits, base_logits)  # the adapter changes the model
        configs.append(json.loads((adapter_dir / "adapter_config.json").read_text()))
    assert len({c["r"] for c in configs}) >= 2
    assert len({tuple(c["target_modules"]) for c in configs}) >= 2
    assert {c["base_model_name_or_path"] for c in configs} == {"base"}


def test_expert_set_loads_the_zoo(micro_zoo):
    zoo = load_zoo(micro_zoo)
    experts = ExpertSet.load(zoo.base_dir, zoo.adapter_dirs)
    assert experts.num_experts == len(zoo.expert_names)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(micro_zoo, tmp_path):
    again = build_zoo(tmp_path / "again", preset="micro", seed=0, progress=False)
    assert (again / "manifest.json").read_bytes() == (micro_zoo / "manifest.json").read_bytes()
    other = build_zoo(tmp_path / "other", preset="micro", seed=1, progress=False)
    first, second = (json.loads((d / "manifest.json").read_text())["files"] for d in (micro_zoo, other))
    assert first.keys() == second.keys()
    assert first["base/model.safetensors"] != second["base/model.safetensors"]
    assert first["tasks/reverse/test.jsonl"] != second["tasks/reverse/test.jsonl"]


def test_an_intact_zoo_is_reused_not_rebuilt(zoo_copy, monkeypatch):
    monkeypatch.setattr(zoo_build, "_build_into", lambda *a: pytest.fail("rebuilt an intact zoo"))
    assert build_zoo(zoo_copy, preset="micro", seed=0, progress=False) == zoo_copy


def test_a_zoo_built_from_other_preset_settings_is_rebuilt(zoo_copy, monkeypatch, caplog):
    from evox_merge.zoo.presets import get_preset

    micro = get_preset("micro")
    changed = dataclasses.replace(micro, base_steps=micro.base_steps + 1)
    monkeypatch.setattr(zoo_build, "get_preset", lambda name: changed)
    with caplog.at_level("WARNING"):
        root = build_zoo(zoo_copy, preset="micro", seed=0, progress=False)
    assert "built from other micro settings (base_steps differ)" in caplog.text
    # The new build replaced the old zoo (the old one, still intact, must not pass for "built meanwhile").
    assert root == zoo_copy and load_zoo(root).manifest["settings"]["base_steps"] == micro.base_steps + 1


def test_default_directory_is_a_per_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOX_MERGE_CACHE", str(tmp_path / "cache"))
    assert default_zoo_dir("tiny", 3) == tmp_path / "cache" / "zoo" / "tiny-seed3"
    monkeypatch.delenv("EVOX_MERGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_zoo_dir("micro", 0) == tmp_path / "xdg" / "evox-merge" / "zoo" / "micro-seed0"


def test_a_build_killed_midway_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(zoo_build, "train_expert", crash)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path / "zoo", preset="micro", seed=0, progress=False)
    assert list(tmp_path.iterdir()) == []  # no target, no staging directory
    with pytest.raises(ZooError, match="does not exist.*evox-merge zoo build --out"):
        load_zoo(tmp_path / "zoo")


def test_partial_zoo_is_detected_and_rebuilt(zoo_copy, micro_zoo, tmp_path):
    stale = tmp_path / ".micro-seed0.building-999999999-x"  # a staging dir whose process is gone
    (stale / "base").mkdir(parents=True)
    (stale / STAGING_MARKER).write_text("")
    shutil.rmtree(zoo_copy / "experts" / "length")
    with pytest.raises(ZooError, match=r"experts/length/\S+ is missing.*--preset micro --seed 0"):
        load_zoo(zoo_copy)
    build_zoo(zoo_copy, preset="micro", seed=0, progress=False)
    assert (zoo_copy / "manifest.json").read_bytes() == (micro_zoo / "manifest.json").read_bytes()
    assert not stale.exists()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupted_or_missing_file_is_named_with_the_rebuild_command(zoo_copy, damage):
    target = zoo_copy / "experts" / "sort" / "adapter_model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    else:
        target.unlink()
    expected = "corrupted" if damage == "truncate" else "missing"
    rebuild = f"evox-merge zoo build --out {zoo_copy} --preset micro"
    with pytest.raises(ZooError, match=rf"{target}.*is {expected}.*{rebuild}"):
        load_zoo(zoo_copy)
    if damage == "truncate":
        build_zoo(zoo_copy, preset="micro", seed=0, progress=False, rebuild=True)  # a broken zoo is rebuilt
        load_zoo(zoo_copy)


def test_corrupted_manifest_is_named(zoo_copy):
    (zoo_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ZooError, match=r"manifest\.json is corrupted.*evox-merge zoo build"):
        load_zoo(zoo_copy)


def test_refuses_to_overwrite_what_is_not_this_zoo(micro_zoo, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(ZooError, match="holds no zoo"):
        build_zoo(foreign, preset="micro", seed=0, progress=False)
    assert (foreign / "cat.jpg").read_bytes() == b"meow"
    with pytest.raises(ZooError, match="preset 'micro', seed 0, not preset 'micro', seed 5"):
        build_zoo(micro_zoo, preset="micro", seed=5, progress=False)
    with pytest.raises(ZooError, match="unknown zoo preset 'huge'"):
        build_zoo(tmp_path / "x", preset="huge")


def test_the_t5_preset_builds_dense_experts_that_merge(tmp_path, monkeypatch):
    """The ``t5`` preset's whole build at a test size (the real settings take minutes: benchmarks/results/zoo_t5.md):
    an encoder-decoder base, six fully fine-tuned experts loadable as dense experts, seen and unseen tasks with
    disjoint splits, and a manifest whose scores a search reproduces."""
    import dataclasses
    import json

    import torch
    from transformers import AutoModelForSeq2SeqLM

    from evox_merge.experts import ExpertSet
    from evox_merge.problems.merge_problem import MergeProblem
    from evox_merge.zoo import t5 as t5_module

    small = dataclasses.replace(t5_module.T5, d_model=16, d_ff=32, d_kv=4, num_layers=1, num_heads=2, base_steps=4,
                                expert_steps=3, base_batch_size=4, expert_batch_size=4, validation_size=6,
                                test_size=6)
    monkeypatch.setattr(t5_module, "T5", small)
    root = build_zoo(tmp_path / "t5", preset="t5", seed=0, progress=False)
    zoo = load_zoo(root)
    manifest = json.loads((root / "manifest.json").read_text())
    assert zoo.preset == "t5" and zoo.expert_names == list(t5_module.FAMILIES) and len(zoo.expert_names) == 6
    groups = [manifest["tasks"][spec.name]["group"] for spec in zoo.tasks]
    assert groups.count("seen") == 6 and groups.count("unseen") == 4
    for spec in zoo.tasks:  # disjoint splits
        prompts = [{json.loads(line)["prompt"] for line in open(path)} for path in (spec.path, spec.test_path)]
        assert not prompts[0] & prompts[1] and all(len(p) == 6 for p in prompts)
    assert AutoModelForSeq2SeqLM.from_pretrained(zoo.adapter_dirs[0]).config.is_encoder_decoder
    experts = ExpertSet.load(zoo.base_dir, zoo.adapter_dirs)
    assert not experts.layers and experts.dense and {m["kind"] for m in experts.metadata} == {"dense"}
    problem = MergeProblem(experts, zoo.tasks, batch_size=16)
    scores = problem.evaluate_per_task(torch.cat([torch.zeros(1, 6), torch.eye(6)[:1]]))
    recorded = manifest["validation_scores"]
    for k, spec in enumerate(zoo.tasks):
        assert scores[0, k].item() == pytest.approx(recorded["base"][spec.name], abs=1e-6)
        assert scores[1, k].item() == pytest.approx(recorded[zoo.expert_names[0]][spec.name], abs=1e-6)
