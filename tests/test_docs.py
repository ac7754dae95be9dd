"""The documentation: the site builds with ``mkdocs build --strict``, the generated reference pages are current, the
README stays short with links that resolve, and every code block the pages mark as runnable runs.

A fenced block runs when the line before it is ``<!-- docs-test: run [slow] [micro] -->`` (bash blocks with
``bash -e``, python blocks with ``python``), or is written to a file first with ``<!-- docs-test: file NAME -->``;
a page's marked blocks run in order in one fresh folder. ``micro`` runs a block on the seconds-long ``micro`` zoo
preset in place of ``tiny`` (docs/contributing.md). The zoo cache is private to this module.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- docs-test: (.*?) -->\n```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
ANY_MARKER = re.compile(r"^<!-- docs-test:", re.MULTILINE)
FLAGS = {"run", "slow", "micro"}
LANGUAGES = {"bash": "bash", "python": "python"}


@dataclass
class Block:
    """One marked code block of a page."""

    page: str
    line: int
    action: str  # "run" or "file"
    language: str
    code: str
    flags: frozenset[str] = frozenset()
    file: str = ""


def marked_blocks(path: Path) -> list[Block]:
    """The page's marked blocks, in order; a malformed marker is an error (so a typo cannot hide a block)."""
    text = path.read_text(encoding="utf-8")
    page = path.relative_to(ROOT).as_posix()
    blocks = []
    for match in MARKER.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        words = match.group(1).split()
        if words[0] == "file" and len(words) == 2:
            blocks.append(Block(page, line, "file", match.group(2), match.group(3), file=words[1]))
            continue
        flags = frozenset(words)
        assert words[0] == "run" and flags <= FLAGS, f"{page}:{line}: unknown docs-test marker {match.group(1)!r}"
        assert match.group(2) in LANGUAGES, f"{page}:{line}: a runnable block must be bash or python"
        blocks.append(Block(page, line, "run", match.group(2), match.group(3), flags=flags))
    assert len(blocks) == len(ANY_MARKER.findall(text)), f"{page}: a docs-test marker not right before a fenced block"
    return blocks


def pages_with_blocks() -> dict[str, list[Block]]:
    """Every page (README.md and docs/**) with at least one marked block."""
    found = {}
    for path in [README, *sorted(DOCS.rglob("*.md"))]:
        blocks = marked_blocks(path)
        if blocks:
            found[path.relative_to(ROOT).as_posix()] = blocks
    return found


PAGES = pages_with_blocks()


def on_micro(code: str) -> str:
    """The block with the ``micro`` zoo preset in place of ``tiny`` (the preset the pages name)."""
    changed = code.replace("--preset tiny", "--preset micro").replace('preset="tiny"', 'preset="micro"')
    changed = re.sub(r"(evox-merge search --zoo)(?![^\n]*--preset)", r"\1 --preset micro", changed)
    return changed


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory) -> Path:
    """A zoo cache for this module alone (the micro zoo builds in seconds, once)."""
    return tmp_path_factory.mktemp("zoo_cache")


def _environment(zoo_cache: Path) -> dict[str, str]:
    env = {**os.environ, "EVOX_MERGE_CACHE": str(zoo_cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def test_the_pages_mark_blocks_to_run():
    """The guides claim runnable examples; the markers that make this module run them must be there."""
    runnable = [block for blocks in PAGES.values() for block in blocks if block.action == "run"]
    assert {"docs/getting-started.md", "docs/guides/your-models.md", "docs/guides/extending.md"} <= set(PAGES)
    assert sum(block.language == "python" for block in runnable) >= 3
    assert sum(block.language == "bash" for block in runnable) >= 5


@pytest.mark.parametrize("page", [
    pytest.param(page, marks=[pytest.mark.slow] if any("slow" in b.flags for b in blocks) else [])
    for page, blocks in PAGES.items()
])
def test_marked_blocks_run(page, zoo_cache, tmp_path):
    """Each marked block of the page runs (exit status 0), in order, in one folder."""
    env = _environment(zoo_cache)
    for i, block in enumerate(PAGES[page]):
        where = f"{page}:{block.line}"
        if block.action == "file":
            target = tmp_path / block.file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.code, encoding="utf-8")
            continue
        code = block.code
        if "micro" in block.flags:
            code = on_micro(code)
            assert code != block.code, f"{where}: marked micro but names no tiny preset nor --zoo"
        script = tmp_path / f"_block{i}.{'py' if block.language == 'python' else 'sh'}"
        script.write_text(code, encoding="utf-8")
        command = [sys.executable, script.name] if block.language == "python" else ["bash", "-e", script.name]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert done.returncode == 0, f"{where} failed ({done.returncode}):\n{output}"


def test_reference_pages_are_current():
    """docs/reference/{config,cli,api}.md are what docs/tools/reference.py makes from the code now."""
    done = subprocess.run([sys.executable, "docs/tools/reference.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def test_the_config_reference_names_every_key():
    """Every key of the pydantic config models has a row (nested ones by their dotted path)."""
    from evox_merge.run.config import SearchConfig

    text = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    for name in SearchConfig.model_fields:
        assert f"| `{name}` |" in text, name
    for name in SearchConfig.model_fields["algorithm"].annotation.model_fields:
        assert f"| `algorithm.{name}` |" in text, name


def test_readme_is_short_and_its_links_resolve():
    """README.md stays a front page (<= 150 lines); its relative links point at files that exist."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    relative = [link for link in links if "://" not in link]
    assert relative
    missing = [link for link in relative if not (ROOT / link).exists()]
    assert not missing, missing


def test_relative_links_resolve_in_the_repository():
    """Links between README.md, docs/ and benchmarks/ work where GitHub shows them, not only on the site (whose hook
    maps them: docs/tools/hooks.py)."""
    benchmarks = ROOT / "benchmarks"
    pages = [README, *DOCS.rglob("*.md"), benchmarks / "README.md", *(benchmarks / "results").rglob("*.md")]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in link and not (page.parent / link).exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}")
    assert not broken, broken


def test_the_results_index_lists_every_results_file():
    """benchmarks/README.md names every file and folder of benchmarks/results/ (history/ lists its own)."""
    results = ROOT / "benchmarks" / "results"
    index = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    history = (results / "history" / "README.md").read_text(encoding="utf-8")
    missing = [entry.name for entry in results.iterdir() if entry.name != "history" and entry.name not in index]
    missing += [f"history/{entry.name}" for entry in (results / "history").iterdir()
                if entry.name != "README.md" and entry.name not in history]
    assert not missing, f"add these to the results index (benchmarks/README.md): {missing}"


@pytest.mark.slow
def test_the_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: every page, link, anchor and docstring the site shows must resolve."""
    if os.environ.get("EVOX_MERGE_DOCS_REQUIRED") != "1":
        pytest.importorskip("mkdocs", reason="the docs extra is not installed (CI installs it)")
        pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for page in ("index.html", "getting-started/index.html", "reference/config/index.html",
                 "reference/api/index.html", "benchmarks/index.html", "benchmarks/results/sweep_t5/index.html"):
        assert (site / page).is_file(), page
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert "run_search" in api and "dense_targets" in api  # mkdocstrings rendered the docstrings
