"""Blocked integer weights for ONNX Runtime: symmetric int4/int8 with one float scale per block
of 32 input columns, and the numbers ONNX Runtime computes with for them.

One quantization serves both weight forms the exporter writes: standard
`DequantizeLinear(int4/int8, block_size) → MatMul` (any ONNX runtime; ORT's CPU fuses it into
its MatMulNBits kernel) and the packed expert tensors of ORT's `QMoE` (uint8 codes with the
default zero point 2^(bits-1), low nibble first along the input axis). Both dequantize to
exactly `codes * scale`, which is what `dequantize` returns for verification.

ORT's fused kernels run with accuracy level 4: each block of 32 input activations is
quantized to int8 with scale max|a|/127 before the integer dot product. `round_activations`
reproduces that so a quantized export is verified against the numbers it should compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32
TYPES = {"int8": 8, "int4": 4}
ACCURACY_LEVEL = 4  # int8 activations in MatMulNBits / QMoE (ORT's fast CPU path)


def quantizable(shape: tuple[int, ...]) -> bool:
    """Input width (last axis of an (out, in) weight) must fill whole blocks."""
    return shape[-1] % BLOCK == 0


@dataclass
class Blocked:
    codes: np.ndarray  # int8 (out, in): signed codes in [-2^(b-1), 2^(b-1)-1]
    scales: np.ndarray  # float32 (out, in // BLOCK)
    bits: int

    def dequantize(self) -> np.ndarray:
        out, k = self.codes.shape
        blocks = self.codes.reshape(out, k // BLOCK, BLOCK).astype(np.float32)
        return (blocks * self.scales[..., None]).reshape(out, k)

    def packed_uint(self) -> np.ndarray:
        """QMoE's bytes: unsigned codes (+2^(b-1)), two per byte for 4 bits (low nibble first)."""
        u = (self.codes.astype(np.int16) + (1 << (self.bits - 1))).astype(np.uint8)
        return u if self.bits == 8 else (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def quantize(weight: np.ndarray, bits: int) -> Blocked:
    """Symmetric blocks along the input axis of an (out, in) weight: scale = max|w| / (2^(b-1)-1)."""
    w = np.asarray(weight, dtype=np.float32)
    out, k = w.shape
    blocks = w.reshape(out, k // BLOCK, BLOCK)
    qmax = (1 << (bits - 1)) - 1
    scales = (np.abs(blocks).max(-1) / qmax).astype(np.float32)
    safe = np.where(scales == 0, 1, scales)[..., None]
    codes = np.clip(np.rint(blocks / safe), -qmax - 1, qmax).astype(np.int8)
    return Blocked(codes.reshape(out, k), scales, bits)


def stored_bytes(numel: int, kind: str | None) -> int:
    """Bytes a weight of `numel` values takes as `kind` ("int8"/"int4": codes plus one float32
    scale per block; None: float32)."""
    if kind is None:
        return 4 * numel
    return numel * TYPES[kind] // 8 + numel // BLOCK * 4


def roundtrip(weight: np.ndarray, kind: str) -> np.ndarray:
    """The float32 values a weight holds after being stored as `kind`."""
    return quantize(weight, TYPES[kind]).dequantize()


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """ONNX INT4 tensor bytes: elements in row-major order, two a byte, first in the low nibble."""
    flat = codes.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """x as ORT's accuracy-level-4 kernels see it: int8 per block of 32 along the last axis."""
    if x.numel() == 0:
        return x
    shape = x.shape
    blocks = x.reshape(-1, shape[-1] // BLOCK, BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.round(blocks / safe).clamp(-127, 127) * scale).reshape(shape)
