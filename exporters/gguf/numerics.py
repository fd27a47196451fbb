"""The numbers llama.cpp computes with for a GGUF: weights as the file stores them, and each
matmul's input rounded the way ggml-cpu's kernel for that weight type rounds it.

Plugged into the reference executor (moecompile.runtime.executor.Numerics), they let
verification hold a rounded export to a tight tolerance instead of a loose one. Keyed by IR
path, so a tied embedding and output head can differ.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from moecompile import ir

from .types import Q, ggml, roundtrip

# matmul input type of llama.cpp's CPU kernels per weight type (ggml type_traits vec_dot_type)
_KERNEL_INPUT = {Q.Q8_0: Q.Q8_0, Q.Q4_0: Q.Q8_0, Q.Q5_0: Q.Q8_0, Q.Q4_1: Q.Q8_0, Q.Q5_1: Q.Q8_0,
                 Q.IQ4_NL: Q.Q8_0, Q.Q2_K: Q.Q8_K, Q.Q3_K: Q.Q8_K, Q.Q4_K: Q.Q8_K,
                 Q.Q5_K: Q.Q8_K, Q.Q6_K: Q.Q8_K, Q.IQ4_XS: Q.Q8_K, Q.F16: Q.F16, Q.BF16: Q.BF16}


def round_q8_k(x: np.ndarray) -> np.ndarray:
    """Values after ggml's quantize_row_q8_K_ref (blocks of 256, scale from the value of largest
    magnitude, round half to even). Q4_0/Q5_x inputs use Q8_0/Q8_1, whose values equal Q8_0's."""
    shape = x.shape
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 256)
    pick = np.abs(blocks).argmax(axis=1)
    peak = blocks[np.arange(len(blocks)), pick]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(peak == 0, 0, np.float32(-127.0) / peak).astype(np.float32)
        q = np.minimum(np.rint(iscale[:, None] * blocks), 127)
        out = np.where(peak[:, None] == 0, 0, q * (np.float32(1.0) / iscale)[:, None])
    return out.astype(np.float32).reshape(shape)


def kernel_input(weight_type: Q | None, x: torch.Tensor) -> torch.Tensor:
    """`x` rounded the way llama.cpp's CPU kernel for a `weight_type` matmul rounds its input."""
    kernel = _KERNEL_INPUT.get(weight_type)
    if kernel is None or x.numel() == 0:
        return x
    array = x.detach().cpu().numpy()
    rounded = round_q8_k(array) if kernel == Q.Q8_K else roundtrip(array, kernel)
    return torch.from_numpy(rounded).to(x.device)


class StoredNumerics:
    """What a GGUF written from `model` computes with: each weight rounded to its IR type
    (what the writer encodes), each matmul input rounded for that type."""

    def __init__(self, model: ir.Model):
        self.types = {path: ggml(name) for path, name in model.types.items()}
        self.exact = all(t == Q.F32 for t in self.types.values())

    def weight(self, path: str, tensor: ir.Tensor) -> torch.Tensor:
        value = tensor.value().to(torch.float32)
        qtype = self.types.get(path, Q.F32)
        return value if qtype == Q.F32 else torch.from_numpy(roundtrip(value.numpy(), qtype))

    def input(self, path: str, x: torch.Tensor) -> torch.Tensor:
        return kernel_input(self.types.get(path), x)


class FileNumerics:
    """What a GGUF file computes with: every weight dequantized from the file's own bytes
    (whatever llama.cpp's quantizer chose), every matmul input rounded as the CPU kernel for
    that weight type rounds it. `planned` (writer.plan) says which IR paths each tensor holds
    and the row transform to undo."""

    def __init__(self, path: Path, planned: list):
        reader = gguf.GGUFReader(str(path))
        data = {t.name: t for t in reader.tensors}
        self.values: dict[str, np.ndarray] = {}
        self.types: dict[str, Q] = {}
        self.exact = True
        for p in planned:
            t = data[p.name]
            qtype = Q(t.tensor_type)
            if qtype == Q.F32:
                continue
            self.exact = False
            value = gguf.quants.dequantize(t.data, qtype).reshape(p.shape)
            parts = [value] if len(p.paths) == 1 else list(value)
            for ir_path, v in zip(p.paths, parts):
                self.values[ir_path] = _undo(p.transform, np.asarray(v, dtype=np.float32))
                self.types[ir_path] = qtype

    def weight(self, path: str, tensor: ir.Tensor) -> torch.Tensor:
        hit = self.values.get(path)
        return tensor.value().to(torch.float32) if hit is None else torch.from_numpy(hit)

    def input(self, path: str, x: torch.Tensor) -> torch.Tensor:
        return kernel_input(self.types.get(path), x)


def _undo(transform, value: np.ndarray) -> np.ndarray:
    """Invert an export-time row permutation (llama's q/k reordering) by permuting indices."""
    if transform is None:
        return value
    index = torch.arange(value.shape[0], dtype=torch.float64)[:, None].expand(-1, value.shape[1])
    order = transform(index.clone())[:, 0].round().long().numpy()
    out = np.empty_like(value)
    out[order] = value
    return out
