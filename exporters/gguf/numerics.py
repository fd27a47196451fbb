"""How ggml-cpu computes, where it differs from torch in more than accumulation order: each
matmul's input rounded for the weight's kernel, RMSNorm and RoPE's tables. The other half,
beside the weights the file stores (reader.FileNumerics), of the numbers llama.cpp computes
with. A last-bit difference here is not harmless: the next activation rounding turns it into
a whole rounding step now and then, attention spreads it and a near-tied router turns it into
another expert (measured: a norm 1.4e-7 apart became 8.7e-3 at a MoE's output), so the
reference mirrors ggml's arithmetic exactly where it can.
"""

from __future__ import annotations

import numpy as np
import torch

from .types import Q, roundtrip

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


def round_q8_0(x: np.ndarray) -> np.ndarray:
    """Values after ggml-cpu's x86 quantize_row_q8_0 (the SIMD path, not the _ref one gguf-py
    mirrors): d = fp16(amax/127) but the codes from id = 127/amax, rounded half to even. The
    two differ on exact ties, frequent in the first layer, whose input comes from bf16/Q8_0
    values (measured: 11 of 8192 codes, q/k/v off by 3.4e-3 of their scale, logits by 3)."""
    shape = x.shape
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ident = np.where(amax == 0, np.float32(0), np.float32(127) / amax).astype(np.float32)
    return (np.rint(blocks * ident) * d).astype(np.float32).reshape(shape)


# Q4_1/Q5_1 blocks (d, m, codes) in bytes; their kernels take Q8_1 input, whose block sum
# s = fp16(d * sum(q)) multiplies the weight block's minimum m
MIN_BLOCK_BYTES = {Q.Q4_1: 20, Q.Q5_1: 24}


def block_mins(data: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray | None:
    """The minimum m of every block of a Q4_1/Q5_1 matrix's bytes, (rows, columns/32) float16;
    None for other types."""
    size = MIN_BLOCK_BYTES.get(qtype)
    if size is None:
        return None
    blocks = np.ascontiguousarray(data).reshape(-1, size)
    return blocks[:, 2:4].copy().view(np.float16).reshape(shape[0], shape[-1] // 32)


def q8_1_sum_excess(x: np.ndarray) -> np.ndarray:
    """Per block of 32 inputs, what ggml's Q8_1 block sum carries beyond the sum of the block's
    rounded values: x86 quantize_row_q8_1 stores s = fp16(d * sum(q)) with d = amax/127 unrounded,
    while the values are q * fp16(d). A Q4_1/Q5_1 dot product adds m * s per block, so llama.cpp
    computes the reference's (rounded input) @ (dequantized weight) plus this excess @ the
    blocks' minima (measured before it was mirrored: the median token 2e-3 off where the null
    is 1e-6, a correct Q5_1 fallback called broken)."""
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ident = np.where(amax == 0, np.float32(0), np.float32(127) / amax).astype(np.float32)
    total = np.rint(blocks * ident[:, None]).sum(axis=1, dtype=np.float32)
    stored = (d * total).astype(np.float16).astype(np.float32)
    excess = stored - d.astype(np.float16).astype(np.float32) * total
    return excess.reshape(*x.shape[:-1], x.shape[-1] // 32)


def kernel_input(weight_type: Q | None, x: torch.Tensor) -> torch.Tensor:
    """`x` rounded the way llama.cpp's CPU kernel for a `weight_type` matmul rounds its input."""
    kernel = _KERNEL_INPUT.get(weight_type)
    if kernel is None or x.numel() == 0:
        return x
    array = x.detach().cpu().numpy()
    rounded = (round_q8_k(array) if kernel == Q.Q8_K else round_q8_0(array)
               if kernel == Q.Q8_0 else roundtrip(array, kernel))
    return torch.from_numpy(rounded).to(x.device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ggml's RMSNorm (ops.cpp): squares summed in float64, the mean cast to float32,
    scale = 1/sqrtf(mean + eps), (x * scale) * weight — bit for bit what llama.cpp computes."""
    xs = x.detach().cpu().numpy().astype(np.float32)
    mean = ((xs * xs).astype(np.float64).sum(-1, keepdims=True) / xs.shape[-1]).astype(np.float32)
    scale = (np.float32(1) / np.sqrt(mean + np.float32(eps))).astype(np.float32)
    y = (xs * scale).astype(np.float32) * weight.detach().cpu().numpy().astype(np.float32)
    return torch.from_numpy(y.astype(np.float32)).to(x.device)


def rope_tables(positions: torch.Tensor, rope, device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos/sin as ggml builds them: theta_{i+1} = theta_i * powf(base, -2/dim) in
    float32 (torch computes base^(-i/dim) directly: 3e-6 apart at far positions)."""
    half = rope.dim // 2
    step = np.float32(np.power(np.float32(rope.theta), np.float32(-2.0) / np.float32(rope.dim),
                               dtype=np.float32))
    theta = np.empty(tuple(positions.shape) + (half,), np.float32)
    current = positions.cpu().numpy().astype(np.float32)
    for i in range(half):
        theta[..., i] = current
        current = (current * step).astype(np.float32)
    cos = np.cos(theta.astype(np.float64)).astype(np.float32)
    sin = np.sin(theta.astype(np.float64)).astype(np.float32)
    cos, sin = (torch.from_numpy(np.concatenate([t, t], -1))[:, None].to(device)
                for t in (cos, sin))
    return cos, sin
