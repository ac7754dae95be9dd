"""The zoo's manifest: what a finished build holds (every file and its hash), and checking a directory against it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from evox_merge.util.errors import ZooError
from evox_merge.util.hashing import file_sha256

MANIFEST_NAME = "manifest.json"
FORMAT = "evox-merge-zoo"
ZOO_VERSION = 1  # bump when a build's bytes change for the same preset and seed
_CACHE_NAME = re.compile(r"^(?P<preset>[a-z0-9]+)-seed(?P<seed>\d+)$")


def rebuild_command(root: Path, preset: str | None = None, seed: int | None = None) -> str:
    """The shell command that rebuilds the zoo at `root` (preset and seed read from a cache-style name if not
    given)."""
    match = _CACHE_NAME.match(root.name)
    preset = preset or (match["preset"] if match else "tiny")
    seed = seed if seed is not None else (int(match["seed"]) if match else 0)
    return f"evox-merge zoo build --out {root} --preset {preset} --seed {seed}"


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` except the manifest, by POSIX path relative to `root`, sorted."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    return {path.relative_to(root).as_posix(): file_sha256(path) for path in files}


def write_manifest(root: Path, content: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (content plus the hashes of every other file, sorted keys) and return its path."""
    manifest = {"format": FORMAT, "zoo_version": ZOO_VERSION, **content, "files": file_hashes(root)}
    path = root / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the zoo at `root`.

    Raises:
        ZooError: the directory or its manifest is missing, unreadable, or from another zoo version; the message
            names the file and the command that rebuilds the zoo.
    """
    if not root.is_dir():
        raise ZooError(f"zoo directory {root} does not exist; build it with: {rebuild_command(root)}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ZooError(
            f"{path} is missing: {root} is not a finished zoo (an interrupted build?); "
            f"rebuild it with: {rebuild_command(root)}"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ZooError(f"{path} is corrupted ({error}); rebuild the zoo with: {rebuild_command(root)}") from error
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT:
        raise ZooError(f"{path} is not an evox-merge zoo manifest; rebuild the zoo with: {rebuild_command(root)}")
    command = rebuild_command(root, manifest.get("preset"), manifest.get("seed"))
    if manifest.get("zoo_version") != ZOO_VERSION:
        raise ZooError(
            f"{path}: zoo_version {manifest.get('zoo_version')!r} was built by another version of evox-merge "
            f"(this one builds version {ZOO_VERSION}); rebuild it with: {command}"
        )
    return manifest


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Check that every file the manifest lists exists with its recorded hash.

    Raises:
        ZooError: naming the first missing or corrupted file and the command that rebuilds the zoo.
    """
    command = rebuild_command(root, manifest.get("preset"), manifest.get("seed"))
    for name, expected in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise ZooError(f"zoo file {path} is missing; rebuild the zoo with: {command}")
        if file_sha256(path) != expected:
            raise ZooError(
                f"zoo file {path} is corrupted (its SHA-256 differs from {root / MANIFEST_NAME}); "
                f"rebuild the zoo with: {command}"
            )


def software_versions(**extra: str) -> dict[str, str]:
    """The library versions a zoo build depends on (for its manifest), plus `extra` ones."""
    import peft
    import tokenizers
    import torch
    import transformers

    return {
        "python": ".".join(map(str, sys.version_info[:3])),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tokenizers": tokenizers.__version__,
        **extra,
    }
