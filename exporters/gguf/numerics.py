"""How ggml-cpu rounds each matmul's input for a weight type: the other half, beside the weights
the file stores (reader.FileNumerics), of the numbers llama.cpp computes with. Plugged into the
reference executor, they let verification hold a rounded export to a tight tolerance instead of
a loose one.
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


def kernel_input(weight_type: Q | None, x: torch.Tensor) -> torch.Tensor:
    """`x` rounded the way llama.cpp's CPU kernel for a `weight_type` matmul rounds its input."""
    kernel = _KERNEL_INPUT.get(weight_type)
    if kernel is None or x.numel() == 0:
        return x
    array = x.detach().cpu().numpy()
    rounded = round_q8_k(array) if kernel == Q.Q8_K else roundtrip(array, kernel)
    return torch.from_numpy(rounded).to(x.device)
