"""The zoo's manifest: what a finished build holds (every file and its hash), checking a directory against it, and
deciding what a build may do with an existing directory (`plan_target`: reuse it, build there, or replace it).

The manifest is also the proof that a directory is a zoo this package wrote: a build replaces only a directory whose
manifest it can read, only when the directory holds nothing the manifest does not list, and only when every listed
file still has its recorded bytes (or with ``--rebuild``, which names the files whose edits it discards).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evox_merge.util.errors import ZooError
from evox_merge.util.hashing import file_sha256
from evox_merge.util.ownership import STAGING_MARKER, compare, content_hashes, few, safe_names

MANIFEST_NAME = "manifest.json"
FORMAT = "evox-merge-zoo"
ZOO_VERSION = 1  # bump when a build's bytes change for the same preset and seed
_CACHE_NAME = re.compile(r"^(?P<preset>[a-z0-9]+)-seed(?P<seed>\d+)$")


REBUILD_FLAG = "--rebuild"


def rebuild_command(root: Path, preset: str | None = None, seed: int | None = None, replace: bool = False) -> str:
    """The shell command that rebuilds the zoo at `root` (preset and seed read from a cache-style name if not
    given), with `REBUILD_FLAG` when it must replace files that changed since the build (`replace`)."""
    match = _CACHE_NAME.match(root.name)
    preset = preset or (match["preset"] if match else "tiny")
    seed = seed if seed is not None else (int(match["seed"]) if match else 0)
    command = f"evox-merge zoo build --out {root} --preset {preset} --seed {seed}"
    return f"{command} {REBUILD_FLAG}" if replace else command


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` except the manifest (and a staging folder's marker), by POSIX path
    relative to `root`, sorted."""
    return content_hashes(root, skip={MANIFEST_NAME, STAGING_MARKER})


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
    manifest, problem = _read(root)
    if manifest is None:
        raise ZooError(f"{root / MANIFEST_NAME} {problem}: {root} is not a finished zoo, and a build replaces only "
                       f"a zoo whose manifest it can read; move or delete {root} yourself, then build it with: "
                       f"{rebuild_command(root)}")
    command = rebuild_command(root, manifest.get("preset"), manifest.get("seed"))
    if manifest.get("zoo_version") != ZOO_VERSION:
        raise ZooError(
            f"{root / MANIFEST_NAME}: zoo_version {manifest.get('zoo_version')!r} was built by another version of "
            f"evox-merge (this one builds version {ZOO_VERSION}); rebuild it with: {command}"
        )
    return manifest


def _read(root: Path) -> tuple[dict[str, Any] | None, str]:
    """The manifest in `root` if it is a readable evox-merge zoo manifest (of any zoo version), else None and what
    is wrong with it (``is missing``, ...)."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None, "is missing"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"is corrupted ({error})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT or not safe_names(files):
        return None, "is not an evox-merge zoo manifest"
    return manifest, ""


@dataclass(frozen=True)
class ZooPlan:
    """What a build does with its target directory.

    Attributes:
        action: ``reuse`` (an intact zoo of this preset, seed and settings), ``build`` (nothing there, or an empty
            directory) or ``replace`` (a zoo this package wrote, to rebuild for `reason`).
        reason: why the zoo there is rebuilt (for the warning), for ``replace``.
        files: the files of the zoo there (its manifest's, and the manifest): all a rebuild may delete.
    """

    action: str
    reason: str | None = None
    files: list[str] = field(default_factory=list)


def plan_target(root: Path, preset: str, seed: int, settings: dict, rebuild: bool = False) -> ZooPlan:
    """Decide, from the files alone, what a build of `preset`, `seed` and preset `settings` does with `root`.

    A zoo of this preset and seed whose files all have their recorded hashes, built from these settings by this
    zoo version, is reused (files the manifest does not list are left alone). Any other zoo this package wrote is
    replaced, only when the directory holds nothing its manifest does not list, and, when files changed since
    the build, only with `rebuild`.

    Raises:
        ZooError: `root` is a file; a non-empty directory without a readable zoo manifest; a zoo of another preset
            or seed; a zoo to rebuild beside files its manifest does not list (never deleted: move them); a zoo
            whose files changed, without `rebuild`. Each message names the directory, the files and what to do.
    """
    if not root.exists() and not root.is_symlink():
        return ZooPlan("build")
    if not root.is_dir():
        raise ZooError(f"zoo path {root} is a file, not a directory; choose another --out")
    if not any(root.iterdir()):
        return ZooPlan("build")
    manifest, problem = _read(root)
    if manifest is None:
        raise ZooError(f"{root} is not empty and holds no zoo that evox-merge built ({MANIFEST_NAME} {problem}); "
                       "a build replaces only a zoo whose manifest it can read and never deletes other files: choose "
                       f"another directory (--out, or --zoo-dir for search --zoo) or empty {root} yourself")
    if (manifest.get("preset"), manifest.get("seed")) != (preset, seed):
        raise ZooError(
            f"{root / MANIFEST_NAME} is a zoo of preset {manifest.get('preset')!r}, seed {manifest.get('seed')}, not "
            f"preset {preset!r}, seed {seed}; choose another --out or delete it"
        )
    differences = compare(root, manifest["files"], skip={MANIFEST_NAME})
    built = manifest.get("settings") if isinstance(manifest.get("settings"), dict) else {}
    wanted = json.loads(json.dumps(settings))
    if manifest.get("zoo_version") != ZOO_VERSION:
        reason = (f"it was built by another version of evox-merge (zoo_version {manifest.get('zoo_version')!r}; "
                  f"this one builds {ZOO_VERSION})")
    elif built != wanted:
        changed = sorted(k for k in set(built) | set(wanted) if built.get(k) != wanted.get(k))
        reason = f"it was built from other {preset} settings ({', '.join(changed)} differ)"
    elif differences.changed or differences.missing:
        reason = "some of its files are missing or changed"
    else:
        return ZooPlan("reuse")
    if differences.extra:
        raise ZooError(f"the zoo in {root} must be rebuilt ({reason}), but {root} also holds "
                       f"{len(differences.extra)} file(s) that its {MANIFEST_NAME} does not list "
                       f"({few(differences.extra)}); a build never deletes files it did not write: move them out of "
                       f"{root}, then build again")
    if differences.changed and not rebuild:
        raise ZooError(f"the zoo in {root} must be rebuilt ({reason}), which would discard the changes to "
                       f"{len(differences.changed)} of its files since it was built ({few(differences.changed)}): "
                       f"copy them elsewhere to keep them, then run: "
                       f"{rebuild_command(root, preset, seed, replace=True)}")
    return ZooPlan("replace", reason, [*manifest["files"], MANIFEST_NAME])


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
                f"rebuild the zoo with: {rebuild_command(root, manifest.get('preset'), manifest.get('seed'), True)}"
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
