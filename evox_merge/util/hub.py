"""Models, tokenizers and adapters by local folder or Hugging Face Hub id, resolved through the local Hub cache.

A reference is a folder (absolute, or relative to the config file) or a Hub id ``org/name``, optionally pinned to a
revision (branch, tag or commit) as ``org/name@revision``. A Hub id is looked up in the local Hub cache first
(``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``): the cached snapshot of that revision is used as is, with
no network access. Only when the cache lacks it and ``HF_HUB_OFFLINE`` is not set is it downloaded (config,
tokenizer and safetensors files only). Either way the commit that was resolved is recorded (`ModelSource.commit`),
so recipe.json says exactly which weights were merged even when ``main`` moves later.

``huggingface_hub`` is imported only when a Hub id is resolved, so checking a config of local folders stays cheap.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from evox_merge.util.errors import MergeInputError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model, tokenizer or adapter reference was found.

    Attributes:
        ref: the reference as given (an absolute folder, or ``org/name[@revision]``).
        path: the local folder that holds its files (a Hub cache snapshot for a Hub id).
        repo_id, revision, commit: for a Hub id: the repository, the revision asked for (``main`` by default)
            and the commit it resolved to; None for a local folder.
    """

    ref: str
    path: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


def split_revision(ref: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); anything else -> (ref, None)."""
    name, at, revision = ref.partition("@")
    if at and _HUB_ID.match(name) and revision:
        return name, revision
    return ref, None


def is_hub_id(ref: str) -> bool:
    """Whether `ref` has the form of a Hub id (``org/name`` or ``org/name@revision``)."""
    name, _ = split_revision(ref)
    return bool(_HUB_ID.match(name)) and not ref.startswith((".", "~"))


def hub_cache_dir() -> Path:
    """The Hub cache this process reads, from the environment at call time (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home, "hub").expanduser()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def local_path(ref: str | Path, base_dir: str | Path | None = None) -> Path:
    """`ref` as an absolute local path (relative ones against `base_dir`, default the working directory)."""
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = Path(base_dir if base_dir is not None else Path.cwd()) / path
    return path.resolve()


def resolve_model(ref: str | Path, what: str, base_dir: str | Path | None = None) -> ModelSource:
    """Find the folder behind a model, tokenizer or adapter reference (see the module docstring).

    Args:
        ref: a folder or a Hub id (``org/name[@revision]``).
        what: the config key or option that gave it, for messages (``base``, ``experts[1]``, ``--model``).
        base_dir: the folder relative paths are relative to (default: the working directory).

    Raises:
        MergeInputError: an existing file where a folder is expected, a missing folder that is not a Hub id, or a
            Hub id that is neither in the local cache nor downloadable (offline); the message says which.
    """
    text = str(ref)
    path = local_path(text, base_dir)
    if path.exists():
        if not path.is_dir():
            raise MergeInputError(f"{what}: {path} is a file; expected a model or adapter directory")
        return ModelSource(str(path), str(path))
    if not is_hub_id(text):
        raise MergeInputError(f"{what}: {path} does not exist (expected a local directory or a Hugging Face Hub "
                              "id such as 'org/name' or 'org/name@revision')")
    repo_id, revision = split_revision(text)
    folder = _snapshot(repo_id, revision, what, path)
    return ModelSource(text, folder, repo_id, revision or "main", Path(folder).name)


def _snapshot(repo_id: str, revision: str | None, what: str, path: Path) -> str:
    """The cached snapshot folder of `repo_id` at `revision` (downloaded first when online and missing)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    cache = hub_cache_dir()
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except HFValidationError as error:
        raise MergeInputError(f"{what}: {repo_id!r} is not a valid Hub id ({error})") from None
    except Exception as error:  # LocalEntryNotFoundError and friends: not in the cache
        cached_error = error
    where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")
    hint = (f"{what}: {where} is neither a local directory ({path} does not exist) nor in the local Hugging Face "
            f"cache ({cache})")
    if _offline():
        raise MergeInputError(f"{hint}; HF_HUB_OFFLINE is set, so nothing is downloaded: run `hf download "
                              f"{repo_id}` where the network is reachable (same HF_HUB_CACHE), or fix the path "
                              f"({type(cached_error).__name__})") from None
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=_DOWNLOAD_PATTERNS)
    except Exception as error:  # network, authentication, missing repository or revision
        raise MergeInputError(f"{hint}, and downloading it failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); fix the path, or download "
                              f"it with `hf download {repo_id}` where the network is reachable") from None


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    data = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKey(key)
        data[key] = value
    return data


def read_json_file(path: str | Path, what: str) -> dict:
    """A JSON object from `path`; MergeInputError naming the file, line and column when it is not one, or the key
    when an object gives one twice (JSON parsers keep the later value silently)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as error:
        raise MergeInputError(f"{what}: {path} is not valid JSON ({error.msg} at line {error.lineno}, column "
                              f"{error.colno})") from None
    except _DuplicateKey as error:
        raise MergeInputError(f"{what}: {path} gives the key {error.args[0]!r} twice in one object; JSON readers "
                              "would keep only the later value: give each key once") from None
    except UnicodeDecodeError as error:
        raise MergeInputError(f"{what}: {path} is not UTF-8 text (byte {error.start})") from None
    if not isinstance(data, dict):
        raise MergeInputError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_model_config(folder: str | Path, what: str) -> dict:
    """A model folder's config.json as a dict, checked to be there and to be a JSON object."""
    config_path = Path(folder, "config.json")
    if not config_path.is_file():
        raise MergeInputError(f"{what}: {folder} holds no config.json; expected a Hugging Face model directory "
                              "(save_pretrained)")
    return read_json_file(config_path, what)


def is_dense_expert(path: str | Path) -> bool:
    """Whether an expert folder is a full model (config.json, no adapter_config.json: a dense, fully fine-tuned
    expert, `evox_merge.experts.dense`) rather than a PEFT adapter. Reads no weights (and needs no torch)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()
