"""MkDocs hooks (mkdocs.yml `hooks:`): the benchmark results join the site at the paths they have in the repository.

The guides link to result files as the repository lays them out (``../benchmarks/results/zoo.md`` from
``docs/guide.md``), so that the links work on GitHub. On the site, `on_files` adds benchmarks/README.md (the
results index, the Results page) and everything under benchmarks/results/ as if they lay in docs/benchmarks/,
and `on_page_markdown` rewrites each relative link that leaves its folder: a target under benchmarks/ or docs/ is
pointed at its place on the site; any other target outside docs/ is left as it is, so that ``mkdocs build
--strict`` names it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
MOUNTED = ("benchmarks/README.md", "benchmarks/results")
LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?(\))")


def on_files(files: Files, config) -> Files:
    """Add the results index and every results file (pages, plots, rows) to the site."""
    for mounted in MOUNTED:
        path = ROOT / mounted
        for source in sorted(path.rglob("*") if path.is_dir() else [path]):
            if source.is_file():
                src = source.relative_to(ROOT).as_posix()
                files.append(File(src, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def _repository_path(page_src: str) -> str:
    """Where a site page lives in the repository."""
    return page_src if page_src.startswith("benchmarks/") else f"docs/{page_src}"


def _site_path(repository_path: str) -> str | None:
    """Where a repository file lives on the site, or None when the site does not hold it."""
    if repository_path.startswith("docs/"):
        return repository_path[len("docs/"):]
    if repository_path == MOUNTED[0] or repository_path.startswith(MOUNTED[1] + "/"):
        return repository_path
    return None


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Point relative links that cross docs/ and benchmarks/ at the same files on the site."""
    page_src = page.file.src_uri
    here = posixpath.dirname(_repository_path(page_src))

    def rewrite(match: re.Match) -> str:
        target = match.group(2)
        if "://" in target or target.startswith(("/", "mailto:")) or not target.startswith(".."):
            return match.group(0)
        site = _site_path(posixpath.normpath(posixpath.join(here, target)))
        if site is None:
            return match.group(0)
        relative = posixpath.relpath(site, posixpath.dirname(page_src) or ".")
        return f"{match.group(1)}{relative}{match.group(3) or ''}{match.group(4)}"

    return LINK.sub(rewrite, markdown)
