"""A Hugging Face checkpoint folder, opened lazily.

Only headers are read here: the config, the tokenizer file names, and each safetensors file's
header (names, dtypes, shapes). Tensor data stays on disk until `Checkpoint.read` is called, which
reads only the bytes asked for (one tensor, or one expert's slice of a fused tensor) with one
positioned read into a fresh buffer, from the offsets the header gave. Nothing stays mapped: a
map kept open keeps every page read through it counted in the process's resident memory, which
then grows to the checkpoint's size during an export (measured: 2.2 GiB peak for a 2 GiB
checkpoint, 0.4 GiB without); and opening safetensors' own `safe_open` for each read parses
the shard's whole header again (1 ms a read: 3.2 s of a 16-layer OLMoE pass's 44 s).

Pickled checkpoints (`pytorch_model.bin`) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError

_ST_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # where the tensor's bytes start in the file
    nbytes: int = 0

    def advise(self) -> None:
        """Ask the kernel to start reading this tensor's bytes (a streaming executor calls it
        for the next block while it computes this one)."""
        if self.nbytes and hasattr(os, "posix_fadvise"):
            fd = os.open(self.file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, self.offset, self.nbytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)


@dataclass
class Checkpoint:
    """Names, shapes and dtypes of a checkpoint's tensors, and lazy access to their data."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise UserError(f"{self.path}: tensor '{key}' is missing from the checkpoint") from None

    def read(self, key: str, index: tuple | None = None) -> torch.Tensor:
        """Read one tensor, or only `index` of it (a tuple of ints/slices on the leading dims)."""
        info = self.info(key)
        index_ints = index is None or all(isinstance(i, int) for i in index)
        if index_ints and info.nbytes and len(index or ()) <= len(info.shape):
            return _read_part(info, index or ())
        with safe_open(str(info.file), framework="pt") as handle:
            if index is None:
                return handle.get_tensor(key)
            return handle.get_slice(key)[index]


def _read_part(info: TensorInfo, index: tuple[int, ...]) -> torch.Tensor:
    """The part of a tensor at integer `index` on its leading dims (all of it for ()): a
    contiguous run of its bytes, read with one positioned read into a fresh buffer (which
    releases the GIL). Reading through a private map instead, converted without a copy, was
    slower in the 16-layer OLMoE pass (41-43 s against 38.5) and held more (2.8 GiB against
    1.75)."""
    shape, start = list(info.shape), 0
    item = info.nbytes // max(1, math.prod(shape))
    for i in index:
        if not -shape[0] <= i < shape[0]:
            raise IndexError(f"index {i} out of range for a dimension of size {shape[0]}")
        start = start * shape[0] + i % shape[0]
        shape = shape[1:]
    nbytes = math.prod(shape) * item
    out = torch.empty(nbytes, dtype=torch.uint8)
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.offset + start * nbytes)
        if nbytes and f.readinto(out.numpy()) != nbytes:
            raise UserError(f"{info.file}: truncated while reading a tensor")
    return out.view(_TORCH_DTYPES[info.dtype]).reshape(shape)


def _read_header(file: Path) -> dict:
    """Parse a safetensors header and check that the file holds all the data it announces."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UserError(f"{file}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise UserError(f"{file}: corrupt safetensors header")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{file}: cannot read safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    end = max((meta["data_offsets"][1] for meta in header.values()), default=0)
    if 8 + n + end > size:
        raise UserError(
            f"{file}: truncated safetensors file ({size} bytes, header announces {8 + n + end})"
        )
    for meta in header.values():
        meta["data_start"] = 8 + n  # offsets count from the end of the header
    return header


def _check_shard_name(index: Path, name) -> None:
    """A shard must be a plain file name inside the model folder: an index naming an absolute
    path or a `..` component would make moecompile read (and compile) a file from elsewhere.
    The file itself may be a symlink — the Hugging Face cache lays every snapshot out as links
    into its blob store — so links are followed; only the name is judged."""
    parts = Path(name).parts if isinstance(name, str) else ()
    if (not isinstance(name, str) or not name or Path(name).is_absolute() or "\\" in name
            or len(parts) != 1 or parts[0] in (".", "..")):
        raise UserError(f"{index}: shard name {name!r} is not a file name inside the model "
                        "folder (absolute paths and '..' are refused)")


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise UserError(f"{index}: malformed index ({exc})") from None
        names = sorted(set(weight_map.values()))
        for name in names:
            _check_shard_name(index, name)
        files = [path / name for name in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise UserError(f"{index}: shard file(s) missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise UserError(
            f"{path}: only pickled PyTorch weights (.bin/.pt) found; they run code when loaded, "
            "so moecompile refuses them. Convert to safetensors first, e.g. "
            "AutoModelForCausalLM.from_pretrained(p).save_pretrained(p, safe_serialization=True) "
            "in a trusted environment"
        )
    raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json found")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint folder: config and tensor headers only, no tensor data."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (expected a Hugging Face checkpoint folder)")
    config_file = path / "config.json"
    if not config_file.exists():
        raise UserError(f"{path}: config.json not found")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_file}: invalid JSON ({exc})") from None
    tensors: dict[str, TensorInfo] = {}
    for file in _shard_files(path):
        for key, meta in _read_header(file).items():
            dtype = _ST_DTYPES.get(meta["dtype"])
            if dtype is None:
                raise UserError(f"{file}: tensor '{key}' has unsupported dtype {meta['dtype']}")
            start, end = meta["data_offsets"]
            tensors[key] = TensorInfo(file, dtype, tuple(meta["shape"]), meta["data_start"] + start,
                                      end - start)
    index = path / "model.safetensors.index.json"
    if index.exists():
        announced = set(json.loads(index.read_text())["weight_map"])
        missing = sorted(announced - set(tensors))
        if missing:
            raise UserError(f"{index}: tensor '{missing[0]}' listed in the index is in no shard")
    return Checkpoint(path, config, tensors)
