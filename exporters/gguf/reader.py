"""Reading a GGUF back: its tensor table, and the numbers llama.cpp computes with, in bounded
memory.

`FileNumerics` is what verification runs the reference executor on: every weight dequantized
from the file's own bytes, every matmul input rounded as ggml-cpu's kernel for that weight type
rounds it. It reads one tensor — one expert of a stacked tensor — at a time with positioned
reads, never a map of the whole file: a map keeps every page read through it resident, so
reading a 14 GB file back would hold 14 GB.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from moecompile import ir

from . import ggml
from .numerics import (MIN_BLOCK_BYTES, block_mins, kernel_input, q8_1_sum_excess, rms_norm,
                       rope_tables)
from .types import Q


def read_tensors(path: Path) -> list[tuple[str, tuple[int, ...], Q, int]]:
    """(name, numpy shape, type, bytes) of every tensor of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    return [(t.name, tuple(int(d) for d in reversed(t.shape)), Q(t.tensor_type), int(t.n_bytes))
            for t in reader.tensors]


def tensor_table(path: Path) -> dict[str, tuple[int, int, Q, tuple[int, ...]]]:
    """GGUF name -> (absolute offset, bytes, type, numpy shape), from the header alone."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: (int(t.data_offset), int(t.n_bytes), Q(t.tensor_type),
                     tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors}


class FileNumerics:
    """The numbers a GGUF file computes with, for the IR paths `planned` (writer.plan: which
    paths each tensor holds, and the row transform to undo) places in it. F32 tensors are the
    IR's own values (the file holds them exactly)."""

    def __init__(self, path: Path, planned: list):
        self.path = Path(path)
        table = tensor_table(self.path)
        self.where: dict[str, tuple[int, int, Q, tuple[int, ...], object]] = {}
        self.types: dict[str, Q] = {}
        for p in planned:
            offset, nbytes, qtype, shape = table[p.name]
            if qtype == Q.F32:
                continue
            part_shape = p.part_shape
            part_bytes = nbytes // len(p.paths)
            for index, ir_path in enumerate(p.paths):
                self.types[ir_path] = qtype
                self.where[ir_path] = (offset + index * part_bytes, part_bytes, qtype,
                                       part_shape, p.transform)
        self.exact = all(t == Q.F32 for t in self.types.values())
        # Q4_1/Q5_1 weights' block minima (2 bytes a block, 1/12 of the file's), kept from
        # reading the weight for `matmul_extra`: only llama.cpp's fallback types have them
        self._mins: dict[str, np.ndarray] = {}

    def _read(self, path: str) -> tuple[np.ndarray, Q, tuple[int, ...], object]:
        offset, nbytes, qtype, shape, transform = self.where[path]
        with open(self.path, "rb") as f:
            data = np.frombuffer(os.pread(f.fileno(), nbytes, offset), dtype=np.uint8)
        if qtype in MIN_BLOCK_BYTES:
            self._mins[path] = _undo(transform, block_mins(data, qtype, shape))
        return data, qtype, shape, transform

    def weight(self, path: str, tensor: ir.Tensor) -> torch.Tensor:
        if path not in self.where:
            return tensor.value().to(torch.float32)
        data, qtype, shape, transform = self._read(path)
        return torch.from_numpy(_undo(transform, ggml.dequantize(data, int(qtype), shape)))

    def input(self, path: str, x: torch.Tensor) -> torch.Tensor:
        return kernel_input(self.types.get(path), x)

    def matmul_extra(self, path: str, x: torch.Tensor) -> torch.Tensor | None:
        """What llama.cpp's kernel adds to (rounded x) @ W.T for input `x` (unrounded): for
        Q4_1/Q5_1, the Q8_1 block sums' excess times the weight's block minima."""
        if self.types.get(path) not in MIN_BLOCK_BYTES or x.numel() == 0:
            return None
        if path not in self._mins:
            self._read(path)
        excess = q8_1_sum_excess(x.detach().cpu().numpy())
        return torch.from_numpy(excess @ self._mins[path].astype(np.float32).T).to(x.device)

    # ggml's own arithmetic where it differs from torch's in more than summation order
    rms_norm = staticmethod(rms_norm)
    rope_tables = staticmethod(rope_tables)


def _undo(transform, value: np.ndarray) -> np.ndarray:
    """Invert an export-time row permutation (llama's q/k reordering) by permuting indices."""
    if transform is None:
        return value
    index = torch.arange(value.shape[0], dtype=torch.float64)[:, None].expand(-1, value.shape[1])
    order = transform(index.clone())[:, 0].round().long().numpy()
    out = np.empty_like(value)
    out[order] = value
    return out
