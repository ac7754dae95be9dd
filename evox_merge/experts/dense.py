"""Dense (fully fine-tuned) experts: task vectors ``theta_i - theta_0`` from `save_pretrained` folders.

A dense expert is a model folder (config.json and safetensors weights, one file or shards with
``model.safetensors.index.json``) fine-tuned from the base. Its task vector is ``theta_i - theta_0`` for every
parameter that differs from the base's (or only those a ``targets`` list names). N dense task vectors of a real model
do not fit beside it (Qwen2.5-1.5B x 10 experts is about 26 GB in bf16), so three modes keep them:

* ``memory``: every differing parameter's task vectors stacked in RAM (N x the differing parameters; fastest).
* ``stream``: nothing kept. Each candidate reads each expert's tensor from its safetensors file and the base's own
  from the base's, one tensor at a time (plain reads at the offsets in the file's header, no memory map, so the
  files' pages stay in the OS page cache and out of the process), so only the model, one parameter's slices and
  the merged parameter are resident. Exactly the ``memory`` merge: the task vector is computed the same way
  (``theta_i - theta_0`` in the model's dtype), then added in the same order.
* ``svd``: each Linear or Embedding weight's task vector compressed once to rank ``rank`` with a truncated SVD
  (the relative Frobenius error per expert and parameter is reported in the expert's metadata); the factors join
  the LoRA experts' factors (`evox_merge.experts.kernel.LayerFactors`), so a candidate costs what a LoRA merge
  costs. Other parameters (norms, biases) stay dense in RAM.

Everything that needs no weights is checked before the model loads (`read_dense_expert`): the folder, its config's
architecture against the base's, and every tensor's name, shape and dtype against the base's safetensors headers;
then, from the files, that ``targets`` match the base's tensors and that the expert differs from the base
(`check_targets`, `check_differs_from_base`). Values (finite) are checked while the task vectors are computed,
before any candidate is scored; every error names the file and the tensor.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from evox_merge.util.safetensors_header import read_header
from evox_merge.util.errors import MergeInputError

DENSE_MODES = ("memory", "stream", "svd")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# config.json fields two models must share for one's weights to be a fine-tune of the other's.
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                       "num_attention_heads", "num_key_value_heads", "d_model", "d_ff", "num_layers",
                       "num_decoder_layers", "tie_word_embeddings")


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a safetensors model lives, from the file's header: its file, dtype, shape and byte range
    (absolute offsets in the file)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int = 0
    end: int = 0


def _read_header(file: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset where its data begins (`read_header`), or a handled error
    naming the file."""
    try:
        return read_header(file)
    except (OSError, ValueError) as error:
        raise MergeInputError(f"{file}: not a readable safetensors file ({error})") from None


def safetensors_index(folder: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of a `save_pretrained` model folder (single file or shards), from the headers alone.

    Raises:
        MergeInputError: no safetensors weights (a ``pytorch_model.bin`` folder is named as such), an index naming
            a missing shard, or an unreadable header, naming the file.
    """
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise MergeInputError(f"{index_path}: expected a JSON object with a 'weight_map' ({error})") from None
        files = sorted({folder / name for name in weight_map.values()})
    elif (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    else:
        found = sorted(p.name for p in folder.glob("*.bin"))
        hint = (f" (it holds {found}: load it with from_pretrained and save it again with save_pretrained, which "
                "writes safetensors)") if found else ""
        raise MergeInputError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; expected safetensors weights{hint}")
    entries: dict[str, TensorEntry] = {}
    for file in files:
        if not file.is_file():
            raise MergeInputError(f"{index_path}: names shard {file.name}, which does not exist")
        header, data = _read_header(file)
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                start, end = (data + int(offset) for offset in info["data_offsets"])
                entries[key] = TensorEntry(file, str(info["dtype"]), tuple(info["shape"]), start, end)
            except (KeyError, TypeError, ValueError):
                raise MergeInputError(f"{file}: header entry {key!r} lacks dtype, shape or data_offsets") from None
    return entries


@dataclass(eq=False)
class DenseExpert:
    """One fully fine-tuned expert (see the module docstring).

    Attributes:
        path: the model folder. config: its config.json. tensors: its safetensors entries by name.
        parameters: after loading, the base parameters whose task vector it contributes (names).
        lora_A, lora_B, scaling: in ``svd`` mode, its compressed Linear weights by module path (the same fields
            as a `evox_merge.experts.adapters.LoraAdapter`, scaling 1), so they stack with LoRA experts' factors.
        svd_errors: in ``svd`` mode, the relative Frobenius error of each compressed parameter.
    """

    path: Path
    config: dict
    tensors: dict[str, TensorEntry] = field(repr=False)
    name: str = ""
    parameters: list[str] = field(default_factory=list)
    lora_A: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    lora_B: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    scaling: dict[str, float] = field(default_factory=dict)
    svd_errors: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.path.name

    @property
    def modules(self) -> list[str]:
        """The Linear modules held as factors (``svd`` mode), sorted."""
        return sorted(self.lora_A)


def read_dense_expert(path: str | Path, base_config: dict, base_tensors: dict[str, TensorEntry],
                      base_ref: str) -> DenseExpert:
    """Check a dense expert folder against the base without loading weights: config.json's architecture fields,
    then every tensor's presence, shape and dtype against the base's safetensors headers.

    Raises:
        MergeInputError: naming the file and the field or tensor.
    """
    path = Path(path)
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise MergeInputError(f"{config_path}: not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise MergeInputError(f"{config_path}: expected a JSON object")
    differing = [key for key in ARCHITECTURE_FIELDS if key in base_config or key in config
                 if config.get(key) != base_config.get(key)]
    if differing:
        details = ", ".join(f"{key}: {config.get(key)!r} vs the base's {base_config.get(key)!r}" for key in differing)
        raise MergeInputError(f"{config_path}: another architecture than the base {base_ref!r} ({details}); a dense "
                              "expert must be a fine-tune of the base")
    tensors = safetensors_index(path)
    missing = sorted(set(base_tensors) - set(tensors))
    if missing:
        raise MergeInputError(f"{path}: lacks tensor {missing[0]!r} of the base {base_ref!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + "; expected a complete save_pretrained folder of the same architecture")
    extra = sorted(set(tensors) - set(base_tensors))
    if extra:
        raise MergeInputError(f"{tensors[extra[0]].file}: tensor {extra[0]!r} is not in the base {base_ref!r}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for key, entry in tensors.items():
        expected = base_tensors[key]
        if entry.shape != expected.shape:
            raise MergeInputError(f"{entry.file}: tensor {key!r} has shape {list(entry.shape)} but the base's is "
                                  f"{list(expected.shape)} (another vocabulary or architecture?)")
        if entry.dtype not in _TORCH_DTYPES:
            raise MergeInputError(f"{entry.file}: tensor {key!r} has dtype {entry.dtype}; expected a float dtype")
    return DenseExpert(path=path, config=config, tensors=tensors)


IDENTITY_CHECK_BYTES = 8 << 30
"""`check_differs_from_base` reads at most this many bytes of an expert's and the base's files (8 GiB) before it
leaves the comparison to `build_dense_targets`, after the model loads."""


def check_targets(patterns: Sequence[str], names: Sequence[str]) -> None:
    """Every ``dense.targets`` pattern must match one of the base's parameter `names` (MergeInputError otherwise)."""
    for pattern in patterns:
        if not any(re.search(pattern, name) for name in names):
            raise MergeInputError(f"dense.targets: pattern {pattern!r} matches no parameter of the base")


def check_differs_from_base(expert: DenseExpert, base_tensors: dict[str, TensorEntry],
                            targets: Sequence[str] | None = None) -> None:
    """Before the model loads: refuse a dense expert whose every tensor (among `targets`) equals the base's, read
    from both files tensor by tensor until one differs (bytes, or values in float32 where the dtypes differ).

    A fine-tune differs in its first tensors, so this reads little; an identical copy is read whole, up to
    `IDENTITY_CHECK_BYTES`, past which the check is left to `build_dense_targets` (the same refusal, after the
    load). Equal values stored differently (0.0 and -0.0) count as different here and are caught there.

    Raises:
        MergeInputError: naming the expert's folder.
    """
    reader, read = TensorReader(), 0
    like = torch.empty(0, dtype=torch.float32)
    for key, entry in expert.tensors.items():
        if targets and not any(re.search(pattern, key) for pattern in targets):
            continue
        base = base_tensors[key]
        if read > IDENTITY_CHECK_BYTES:
            return
        read += (entry.end - entry.start) + (base.end - base.start)
        if entry.dtype == base.dtype:
            if reader.read_bytes(entry, key) != reader.read_bytes(base, key):
                return
        elif not torch.equal(reader.read(entry, key, like), reader.read(base, key, like)):
            return
    raise MergeInputError(f"{expert.path}: no parameter differs from the base's" + (" among dense.targets" if targets
                          else "") + " (the base itself, or a copy of it?); expected a fine-tune of the base")


class TensorReader:
    """Reads single tensors from safetensors files by plain reads at their header offsets (files kept open, one
    handle per file; no memory maps, so what was read stays in the page cache, not in the process)."""

    def __init__(self) -> None:
        self._handles: dict[Path, object] = {}

    def read_bytes(self, entry: TensorEntry, key: str) -> bytearray:
        """The stored bytes of tensor `key` of `entry`'s file."""
        handle = self._handles.get(entry.file)
        if handle is None:
            handle = self._handles[entry.file] = open(entry.file, "rb", buffering=0)  # noqa: SIM115
        buffer = bytearray(entry.end - entry.start)
        handle.seek(entry.start)
        if handle.readinto(buffer) != len(buffer):
            raise MergeInputError(f"{entry.file}: tensor {key!r} is cut short (the file changed or is truncated)")
        return buffer

    def read(self, entry: TensorEntry, key: str, like: torch.Tensor) -> torch.Tensor:
        """Tensor `key` of `entry`'s file in `like`'s dtype and on its device."""
        buffer = self.read_bytes(entry, key)
        dtype = _TORCH_DTYPES[entry.dtype]
        tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        return tensor.reshape(entry.shape).to(device=like.device, dtype=like.dtype)


@dataclass(eq=False)
class DenseTarget:
    """The dense task vectors of one base parameter, from the experts that change it.

    Attributes:
        shape, dtype, device: the parameter's.
        expert_index: which experts (indices into the expert set) contribute, in order.
        stack: ``memory`` mode: ``(len(expert_index), *shape)`` task vectors; None when streamed.
        key: ``stream`` mode: the tensor's name in the files; base_entry, expert_entries: where the base's and each
            contributing expert's tensor live; reader: the shared `TensorReader`.
    """

    shape: tuple[int, ...]
    expert_index: list[int]
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    stack: torch.Tensor | None = field(default=None, repr=False)
    key: str = ""
    base_entry: TensorEntry | None = field(default=None, repr=False)
    expert_entries: list[TensorEntry] = field(default_factory=list, repr=False)
    reader: TensorReader | None = field(default=None, repr=False)

    @property
    def streamed(self) -> bool:
        return self.stack is None

    def _empty(self, *leading: int) -> torch.Tensor:
        return torch.zeros((*leading, *self.shape), dtype=self.dtype, device=self.device)

    def base(self) -> torch.Tensor:
        """``stream`` mode: the base's value read from its file (restores a parameter without keeping a copy)."""
        return self.reader.read(self.base_entry, self.key, self._empty())

    def task_vector(self, k: int, base: torch.Tensor | None = None) -> torch.Tensor:
        """The `k`-th contributing expert's task vector (`base`: the parameter's base value, read from the base's
        file when streamed and not given)."""
        if self.stack is not None:
            return self.stack[k]
        base = self.base() if base is None else base
        return self.reader.read(self.expert_entries[k], self.key, base) - base

    def add_merge(self, out: torch.Tensor, base: torch.Tensor | None, values: list[float]) -> None:
        """``out += sum_i c_i tau_i`` over the contributing experts, in order (the same float operations in every
        mode, so ``memory`` and ``stream`` merges are bitwise equal); `values`: the N coefficients as Python floats
        (converted once per candidate by the caller, not once per parameter)."""
        if self.streamed and base is None:
            base = self.base()
        for k, i in enumerate(self.expert_index):
            if values[i] != 0.0:
                out.add_(self.task_vector(k, base), alpha=values[i])

    def merged_delta(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``sum_i c_i tau_i`` ``(*shape)`` for ``coefficients (N,)``, as a new tensor."""
        out = self._empty()
        self.add_merge(out, None, coefficients.detach().double().cpu().tolist())
        return out

    def task_vectors(self, num_experts: int) -> torch.Tensor:
        """Every expert's task vector ``(N, *shape)`` (zeros for the experts that do not change it)."""
        out = self._empty(num_experts)
        base = self.base() if self.streamed else None
        for k, i in enumerate(self.expert_index):
            out[i] = self.task_vector(k, base)
        return out


def _truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A (r, in), B (out, r))`` of the best rank-`rank` approximation of `delta` (SVD in float32) and its
    relative Frobenius error (from the dropped singular values)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, len(s))
    squares = s.double().square()
    total = float(squares.sum())
    error = math.sqrt(float(squares[k:].sum()) / total) if total > 0 else 0.0
    # Copies, not views: a view of the first k rows would keep the whole (min(out, in), in) factor alive.
    return vh[:k].to(delta.dtype).clone(), (u[:, :k] * s[:k]).to(delta.dtype).contiguous(), error


def release_freed_memory() -> None:
    """Hand memory freed by the task-vector pass (many large temporary tensors) back to the OS, where the C
    library can (glibc's ``malloc_trim``; elsewhere nothing): without it the process keeps it as RSS."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)


def build_dense_targets(
    experts: Sequence[tuple[int, DenseExpert]], model: torch.nn.Module, base_tensors: dict[str, TensorEntry],
    mode: str, rank: int | None = None, targets: Sequence[str] | None = None, progress: bool = False,
) -> dict[str, DenseTarget]:
    """Compare every dense expert's tensors with the loaded base model and keep their task vectors by `mode`.

    Args:
        experts: ``(index in the expert set, expert)`` of the dense experts.
        model: the loaded base model (its parameters are theta_0).
        mode: ``memory``, ``stream`` or ``svd`` (module docstring); ``svd`` needs `rank` and fills each expert's
            ``lora_A/lora_B/scaling/svd_errors`` for Linear and Embedding weights instead of returning them.
        targets: regular expressions (``re.search``) on parameter names; only matching parameters are merged
            (default: every parameter that differs).

    Returns:
        parameter name -> `DenseTarget`, in the model's parameter order.

    Raises:
        MergeInputError: a tensor with NaN/inf values or one that is not a parameter of the model (file and tensor
            named), a `targets` pattern that matches nothing, or an expert identical to the base.
    """
    from tqdm.auto import tqdm

    if mode not in DENSE_MODES:
        raise MergeInputError(f"dense.mode must be one of {DENSE_MODES}, got {mode!r}")
    if mode == "svd" and (rank is None or rank < 1):
        raise MergeInputError(f"dense.rank: svd mode needs a rank >= 1, got {rank!r}")
    patterns = [re.compile(t) for t in targets or ()]
    parameters = dict(model.named_parameters())
    matrices = {name for name, module in model.named_modules()
                if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))}
    reader = TensorReader()
    owners: dict[str, list[int]] = {}
    stacks: dict[str, list[torch.Tensor]] = {}
    entries: dict[str, list[TensorEntry]] = {}
    keys = [key for key in parameters if key in base_tensors]
    check_targets([pattern.pattern for pattern in patterns], keys)
    for index, expert in experts:
        changed = []
        for key in tqdm(keys, desc=f"task vectors of {expert.name}", unit="tensor", disable=not progress,
                        leave=False):
            if patterns and not any(p.search(key) for p in patterns):
                continue
            entry = expert.tensors[key]
            base = parameters[key].detach()
            theta = reader.read(entry, key, base)
            bad = int((~torch.isfinite(theta)).sum())
            if bad:
                raise MergeInputError(f"{entry.file}: tensor {key!r} holds {bad} NaN/inf value(s); expected finite "
                                      "weights (a diverged or corrupted fine-tune?)")
            if torch.equal(theta, base):
                continue
            changed.append(key)
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            if mode == "svd" and module in matrices:
                a, b, expert.svd_errors[key] = _truncated_svd(theta - base, rank)
                expert.lora_A[module], expert.lora_B[module], expert.scaling[module] = a, b, 1.0
                continue
            owners.setdefault(key, []).append(index)
            if mode == "stream":
                if len(owners[key]) == 1 and not torch.equal(reader.read(base_tensors[key], key, base), base):
                    raise MergeInputError(f"{base_tensors[key].file}: tensor {key!r} as stored differs from the "
                                          "loaded base model's parameter; stream mode restores parameters from "
                                          "the base's files (use dense.mode: memory)")
                entries.setdefault(key, []).append(entry)
            else:
                stacks.setdefault(key, []).append(theta - base)
        if not changed:
            raise MergeInputError(f"{expert.path}: no parameter differs from the base's"
                                  + (" among dense.targets" if patterns else "")
                                  + " (the base itself, or a copy of it?)")
        expert.parameters = changed
    result = {}
    for key in keys:
        if key not in owners:
            continue
        like = {"shape": tuple(parameters[key].shape), "expert_index": owners[key], "dtype": parameters[key].dtype,
                "device": parameters[key].device}
        if mode == "stream":
            result[key] = DenseTarget(**like, key=key, base_entry=base_tensors[key], expert_entries=entries[key],
                                      reader=reader)
        else:
            parts = stacks.pop(key)  # freed as soon as stacked: peak RAM one parameter's stack above the total
            result[key] = DenseTarget(**like, stack=torch.stack(parts))
            del parts
    return result
