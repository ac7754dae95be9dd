"""The README's promises: `evox-merge search --zoo` end to end, and the Python example as pasted."""

import json
import re
from pathlib import Path

import pytest

from evox_merge.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def micro_cache(tmp_path_factory):
    """A private zoo cache: the micro preset builds in seconds and stands in for tiny."""
    cache = tmp_path_factory.mktemp("cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("EVOX_MERGE_CACHE", str(cache))
    yield cache
    patch.undo()


@pytest.mark.slow
def test_search_zoo_runs_end_to_end_and_prints_the_comparison(micro_cache, tmp_path, capsys):
    assert main(["search", "--zoo", "--preset", "micro", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"Results in {tmp_path / 'run'}" in printed
    assert re.search(r"^Released: (record:\d+|[a-z_]+) \(", printed, re.MULTILINE)
    for merge in ("release", "best_searched", "base", "best_single", "task_arithmetic", "ties"):  # search, selection, test
        assert re.search(rf"^{merge}\s+\d\.\d{{4}}\s+\d\.\d{{4}}\s+\d\.\d{{4}}$", printed, re.MULTILINE), merge
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recipe["search"]["evaluations"] == 16 * 8  # P = 2N = 16, 2 rounds x (1 + 3) generations


@pytest.mark.slow
def test_readme_python_example_runs_as_pasted(micro_cache):
    code = re.search(r"## Use it from Python.*?```python\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    code = code.replace('preset="tiny"', 'preset="micro"')  # the same code on the seconds-long preset
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["workflow"].algorithm.history.fitness.numel() == namespace["algorithm"].evaluations_per_run
