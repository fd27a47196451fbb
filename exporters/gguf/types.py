"""llama.cpp's weight types: the one table the GGUF target chooses, sizes and rounds with.

Type names are ggml's, lower-case ("f16", "q8_0", "q4_k", "q5_0" …); they are what
`Model.types` holds for a GGUF export. Rules are llama.cpp's own:

- routers, norms and biases are never quantized (llama-quant.cpp); moecompile writes them F32;
- a type whose block does not divide a row falls back, as llama.cpp's quantizer does silently
  (Q4_K -> Q5_0, Q6_K -> Q8_0 …, then F16), so a plan's bytes are known before anything is
  written (`stored_type`).

F32/F16/BF16/Q8_0 are encoded by gguf-py's reference encoders (`encode`); k-quants and
i-quants by llama.cpp's own quantizer (quantizer.py), never re-implemented here.
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
DTYPES = ("f32", "f16", "bf16", "q8_0")  # what --dtype writes without llama.cpp's quantizer
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
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


def encode(value: torch.Tensor, qtype: Q) -> np.ndarray:
    """Values → the bytes of `qtype` as llama.cpp reads them (gguf-py's reference encoders).
    A source already in the target's 16-bit type is passed through bit for bit."""
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


def roundtrip(array: np.ndarray, qtype: Q) -> np.ndarray:
    """The float32 values llama.cpp will see after storing `array` as `qtype`."""
    if qtype == Q.F32:
        return np.asarray(array, dtype=np.float32)
    encoded = encode(torch.from_numpy(np.ascontiguousarray(array)), qtype)
    return gguf.quants.dequantize(encoded, qtype).reshape(array.shape)
