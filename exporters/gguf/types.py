"""llama.cpp's weight types: the one table the GGUF target chooses, sizes and rounds with.

Type names are ggml's, lower-case ("f16", "q8_0", "q4_k", "q5_0" …); they are what
`Model.types` holds for a GGUF export. Rules are llama.cpp's own:

- routers, norms and biases are never quantized (llama-quant.cpp); moecompile writes them F32;
- a type whose block does not divide a row falls back, as llama.cpp's quantizer does silently
  (Q4_K -> Q5_0, Q6_K -> Q8_0 …, then F16), so a plan's bytes are known before anything is
  written (`stored_type`).

F32/F16/BF16/Q8_0 are encoded by gguf-py's reference encoders (the same bytes as ggml's), k-quants
and i-quants by ggml's own quantizer (ggml.py), never re-implemented here.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from moecompile.errors import UserError

Q = gguf.GGMLQuantizationType

# the types a user picks with --quant, best first
CHOICES = ("f32", "bf16", "f16", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0", "iq4_xs", "q3_k",
           "q2_k")
QUANTIZED = CHOICES[3:]
DTYPES = ("f32", "f16", "bf16", "q8_0")  # what --dtype takes
_FT = gguf.LlamaFileType
# general.file_type for a file mostly of one type (what llama.cpp's loader prints)
FILE_TYPES = {"f32": _FT.ALL_F32, "f16": _FT.MOSTLY_F16, "bf16": _FT.MOSTLY_BF16,
              "q8_0": _FT.MOSTLY_Q8_0, "q6_k": _FT.MOSTLY_Q6_K, "q5_k": _FT.MOSTLY_Q5_K_M,
              "q5_0": _FT.MOSTLY_Q5_0, "q5_1": _FT.MOSTLY_Q5_1, "q4_k": _FT.MOSTLY_Q4_K_M,
              "q4_0": _FT.MOSTLY_Q4_0, "iq4_xs": _FT.MOSTLY_IQ4_XS, "iq4_nl": _FT.MOSTLY_IQ4_NL,
              "q3_k": _FT.MOSTLY_Q3_K_M, "q2_k": _FT.MOSTLY_Q2_K}
_GGUF_PY = (Q.F32, Q.F16, Q.BF16, Q.Q8_0)  # encoded by gguf-py; the rest by ggml
# llama-quant.cpp tensor_type_fallback: what a type becomes when ne[0] % block != 0
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0,
             Q.IQ4_XS: Q.IQ4_NL}


def ggml(name: str) -> Q:
    """The ggml type of a type name ("q4_k" -> Q4_K)."""
    return Q[name.upper()]


def name_of(qtype: Q) -> str:
    return qtype.name.lower()


def parse_type(name: str) -> str:
    """A user's type name, checked against the types moecompile offers."""
    if name.lower() not in CHOICES:
        raise UserError(f"unknown weight type '{name}'; choose from {', '.join(CHOICES)}")
    return name.lower()


def keeps_f32(gguf_name: str, shape: tuple[int, ...]) -> bool:
    """Tensors llama.cpp never quantizes: 1-D ones, norms, routers (written F32)."""
    return len(shape) < 2 or "_norm" in gguf_name or "ffn_gate_inp" in gguf_name


def block_size(name: str) -> int:
    """Values per block of a type (32 for Q8_0, 256 for the k-quants, 1 for floats)."""
    return gguf.GGML_QUANT_SIZES[ggml(name)][0]


def stored_type(gguf_name: str, shape: tuple[int, ...], name: str) -> str:
    """The type the file holds for a tensor asked to be `name`: F32 where llama.cpp never
    quantizes, the fallback where a row does not fill the type's blocks."""
    if keeps_f32(gguf_name, shape):
        return "f32"
    qtype = ggml(name)
    row = shape[-1]
    if row % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = _FALLBACK.get(qtype, qtype)
        if row % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = Q.F16
    return name_of(qtype)


def tensor_bytes(name: str, shape: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[ggml(name)]
    return int(np.prod(shape)) // block * size


def encode(value: torch.Tensor, qtype: Q, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Values (rows, n) → the bytes of `qtype` as llama.cpp reads them: gguf-py's reference
    encoders for F32/F16/BF16/Q8_0 (which ignore an importance matrix, as llama.cpp does),
    ggml's quantizer with the per-column `imatrix` for the rest. A source already in the
    target's 16-bit type is passed through bit for bit."""
    if qtype not in _GGUF_PY:
        from . import ggml

        return ggml.quantize(value.to(torch.float32).numpy(), int(qtype), imatrix)
    if qtype == Q.BF16 and value.dtype == torch.bfloat16:
        return value.contiguous().view(torch.int16).numpy().view(np.uint8)
    if qtype == Q.F16 and value.dtype == torch.float16:
        return value.contiguous().numpy()
    array = value.to(torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def roundtrip(array: np.ndarray, qtype: Q, imatrix: np.ndarray | None = None) -> np.ndarray:
    """The float32 values llama.cpp will see after storing `array` (rows, n) as `qtype`."""
    from . import ggml

    if qtype == Q.F32:
        return np.asarray(array, dtype=np.float32)
    array = np.ascontiguousarray(array, dtype=np.float32)
    encoded = encode(torch.from_numpy(array.reshape(-1, array.shape[-1])), qtype, imatrix)
    return ggml.dequantize(encoded, int(qtype), array.shape)


def file_type(types: list[tuple[str, int]]) -> str:
    """The general.file_type label of a file of (type, bytes) tensors: the type holding most
    of the quantized (non-F32) bytes, or f32."""
    by_type: dict[str, int] = {}
    for name, nbytes in types:
        if name != "f32":
            by_type[name] = by_type.get(name, 0) + nbytes
    best = max(by_type, key=lambda k: (by_type[k], k)) if by_type else "f32"
    return best if best in FILE_TYPES else "f16"
