"""ggml's own quantizer and dequantizer, one tensor (or one expert) at a time, through ctypes.

Why: writing a whole-model F32 GGUF and re-quantizing it with `llama_model_quantize` costs an
intermediate twice the size of a bf16 checkpoint on disk (187 GB for Mixtral-8x7B). The
function that call uses for the work, `ggml_quantize_chunk`, is exported by the libggml-base
library llama-cpp-python ships, so calling it directly gives the very bytes llama.cpp writes
(checked type by type, with and without an importance matrix, against llama_model_quantize's
output), with no re-implementation of any quantizer.

What llama.cpp's quantizer does around `ggml_quantize_chunk` (src/llama-quant.cpp of the
llama.cpp llama-cpp-python 0.3.36 vendors), and what this module keeps of it:
- rows are quantized independently; a stacked expert tensor gets each expert's own slice of
  the importance matrix (the caller passes one part at a time with its slice);
- a row that does not fill the type's block falls back (types.stored_type decides that before
  anything is written); here such a row is an error, not an abort;
- the output is checked with `ggml_validate_row_data`, as llama.cpp checks it.
- llama.cpp quantizes on every thread it is given, chunk by chunk; so does this module (a
  ctypes call releases the GIL): single-threaded, quantizing was the largest cost of a
  real-size `--budget` (Q4_K with an importance matrix: ~9 M values/s a core, 13 min for
  OLMoE-1B-7B's 6.9 B).
ggml asserts (aborts the process) on a misfit row or a missing required importance matrix:
both are refused here before the call. Dequantizing uses ggml's `to_float` trait: the same
values gguf-py computes, faster.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np

CHUNK_VALUES = 1 << 20  # values handed to one ggml_quantize_chunk call


class _Traits(ctypes.Structure):
    """struct ggml_type_traits (ggml.h)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float),
                             ctypes.c_int64)
_FLOATS = ctypes.POINTER(ctypes.c_float)


@cache
def library() -> ctypes.CDLL:
    """libggml-base from the installed llama_cpp package, with the signatures used here."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise RuntimeError("llama-cpp-python is not installed")
    folder = Path(spec.origin).parent / "lib"
    path = next((folder / n for n in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")
                 if (folder / n).exists()), None)
    if path is None:
        raise RuntimeError(f"no libggml-base library in {folder}")
    lib = ctypes.CDLL(str(path))
    i64, size, ptr = ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p
    for name, result, args in (
            ("ggml_quantize_chunk", size, [ctypes.c_int, _FLOATS, ptr, i64, i64, i64, _FLOATS]),
            ("ggml_quantize_init", None, [ctypes.c_int]),
            ("ggml_quantize_requires_imatrix", ctypes.c_bool, [ctypes.c_int]),
            ("ggml_validate_row_data", ctypes.c_bool, [ctypes.c_int, ptr, size]),
            ("ggml_row_size", size, [ctypes.c_int, i64]),
            ("ggml_blck_size", i64, [ctypes.c_int]),
            ("ggml_get_type_traits", ctypes.POINTER(_Traits), [ctypes.c_int])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = result, args
    return lib


def quantize(values: np.ndarray, qtype: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml's bytes for float32 `values` (rows, n) as ggml type `qtype`, with per-column
    importance `imatrix` (n,) or none. Raises ValueError where ggml would abort or llama.cpp
    would refuse the result."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, values.shape[-1])
    rows, n = values.shape
    lib = library()
    if n % lib.ggml_blck_size(qtype):
        raise ValueError(f"ggml type {qtype}: rows of {n} values do not fill its blocks")
    weights = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.size != n or not np.isfinite(imatrix).all():
            raise ValueError(f"importance matrix of {imatrix.size} values for rows of {n}, or "
                             "not finite")
        weights = imatrix.ctypes.data_as(_FLOATS)
    elif lib.ggml_quantize_requires_imatrix(qtype):
        raise ValueError(f"ggml type {qtype} cannot be quantized without an importance matrix")
    row_bytes = lib.ggml_row_size(qtype, n)
    out = np.empty(rows * row_bytes, dtype=np.uint8)
    lib.ggml_quantize_init(qtype)  # its tables, once, before any thread uses them
    step = max(1, CHUNK_VALUES // n)

    def chunk(first: int) -> bool:
        count = min(step, rows - first)
        src = ctypes.cast(values.ctypes.data + first * n * 4, _FLOATS)
        dst = out.ctypes.data + first * row_bytes
        done = lib.ggml_quantize_chunk(qtype, src, dst, 0, count, n, weights)
        return done == count * row_bytes and lib.ggml_validate_row_data(qtype, dst, done)

    for first, valid in zip(range(0, rows, step), _map(chunk, range(0, rows, step))):
        if not valid:
            raise ValueError(f"ggml type {qtype}: quantized rows {first}.."
                             f"{min(first + step, rows)} are invalid (non-finite weights?)")
    return out


def dequantize(data: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of ggml `data` of type `qtype`, in numpy `shape`."""
    count = int(np.prod(shape))
    data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if qtype == 0:  # F32
        return data.view(np.float32).reshape(shape).copy()
    traits = library().ggml_get_type_traits(qtype).contents
    if data.size != library().ggml_row_size(qtype, count):
        raise ValueError(f"{data.size} bytes do not hold {count} values of ggml type {qtype}")
    out = np.empty(count, dtype=np.float32)
    to_float = _TO_FLOAT(traits.to_float)
    step = max(1, CHUNK_VALUES // traits.blck_size) * traits.blck_size  # whole blocks

    def chunk(first: int) -> None:
        n = min(step, count - first)
        to_float(data.ctypes.data + first // traits.blck_size * traits.type_size,
                 ctypes.cast(out.ctypes.data + 4 * first, _FLOATS), n)

    list(_map(chunk, range(0, count, step)))
    return out.reshape(shape)


def _map(fn, items: range):
    """fn over items on every core (each call is a ctypes call into ggml, which releases the
    GIL), in order; in this thread when there is one item. ggml's chunks are independent rows
    or blocks, so the bytes do not depend on how they are split: llama.cpp's own quantizer
    splits the same way over its threads."""
    if len(items) < 2:
        return map(fn, items)
    return _pool().map(fn, items)


@cache
def _pool() -> ThreadPoolExecutor:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return ThreadPoolExecutor(max_workers=cores or 1,
                              thread_name_prefix="moecompile-ggml")
