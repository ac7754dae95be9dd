"""`python -m benchmarks.gpu --smoke` runs the GPU benchmark's code on the CPU with tiny shapes, so that the script is
known to work before a GPU is lent; it never writes benchmarks/results/gpu.md."""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu import RESULTS, main, peak_flops

ROOT = Path(__file__).resolve().parents[1]


def raw_numbers(path: Path) -> dict:
    """The JSON block at the end of a results file."""
    text = path.read_text()
    return json.loads(text[text.index("```json\n") + len("```json\n") : text.rindex("```")])


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def test_the_smoke_run_measures_both_shapes_on_the_cpu_in_under_a_minute(tmp_path):
    out = tmp_path / "gpu_smoke.md"
    before = digest(RESULTS)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out", str(out), "--tmp",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert seconds < 60, f"the smoke run took {seconds:.0f} s"
    assert digest(RESULTS) == before  # gpu.md's GPU numbers (or its status line) untouched
    raw = raw_numbers(out)
    assert raw["status"] == "complete" and raw["meta"]["smoke"] and not raw["skipped"]
    assert set(raw["shapes"]) == {"1B", "8B"}
    for label, facts in raw["shapes"].items():
        assert facts["dtype"] == "bfloat16" and facts["floor_flop"] > 0 and facts["head_tokens"] > 0
        assert facts["body_tokens"] > facts["head_tokens"]  # prompts and prefixes are read, not scored
        rows = [row for row in raw["rows"] if row["shape"] == label]
        assert [row["per_pass"] for row in rows] == [1, 2, 4]
        assert all(row["finite"] and row["candidates_per_s"] > 0 for row in rows)
        # several candidates per pass score the same candidates as one per pass, up to bfloat16 rounding
        assert all(row["max_abs_diff_vs_first_row"] < 0.05 for row in rows)
        (loop,) = [row for row in raw["mergekit_loop"] if row["shape"] == label]
        assert loop["seconds"] >= loop["save_s"] + loop["load_s"] and loop["max_abs_diff_vs_in_place"] < 1e-6
        assert raw["summary"][label]["speedup_over_mergekit_loop"] > 0
    text = out.read_text()
    assert text.startswith("# GPU benchmark") and "Status: complete" in text and "| 8B |" in text


def test_a_short_budget_skips_the_8b_shape_and_keeps_what_ran(tmp_path):
    out = tmp_path / "short.md"
    report = main(["--smoke", "--out", str(out), "--budget-s", "0", "--tmp", str(tmp_path)])
    raw = raw_numbers(out)
    assert list(raw["shapes"]) == ["1B"] and [row["per_pass"] for row in raw["rows"]] == [1]  # the first row runs
    assert any(s.startswith("8B shape:") for s in raw["skipped"]) and any("P=2" in s for s in raw["skipped"])
    assert not raw["mergekit_loop"] and report.status.startswith("complete, with")


def test_the_smoke_run_never_writes_the_gpu_results():
    with pytest.raises(SystemExit):
        main(["--smoke", "--out", str(RESULTS)])


def test_the_peak_comes_from_the_card_name():
    assert peak_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert peak_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert peak_flops("NVIDIA H200")[0] == 989e12
    assert peak_flops("Some Other Card")[0] is None
