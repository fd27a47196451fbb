"""llama.cpp weight types through llama.cpp's own quantizer (`llama_model_quantize`).

K-quants and i-quants are not re-implemented here: an F32 GGUF written by moecompile is
re-quantized by llama.cpp, with one explicit type per tensor (`tt_overrides`, anchored exact
names, `pure` so llama.cpp's own mix rules stay out of the way) and optionally an importance
matrix. The quantizer runs in a child process: it aborts the whole process on some inputs.

Sizes are predicted with llama.cpp's rules, including its silent fallback when a row does not
fit the type's block (Q4_K -> Q5_0 and so on, then F16), so a plan's bytes are known before
anything is written.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

from moecompile.errors import UserError

Q = gguf.GGMLQuantizationType

# the types a user picks (name -> ggml type), best first
TYPES: dict[str, Q] = {
    "f32": Q.F32, "bf16": Q.BF16, "f16": Q.F16, "q8_0": Q.Q8_0, "q6_k": Q.Q6_K, "q5_k": Q.Q5_K,
    "q4_k": Q.Q4_K, "q4_0": Q.Q4_0, "iq4_xs": Q.IQ4_XS, "q3_k": Q.Q3_K, "q2_k": Q.Q2_K,
}
QUANTIZED = [n for n in TYPES if n not in ("f32", "bf16", "f16")]
# llama-quant.cpp tensor_type_fallback: what a type becomes when ne[0] % block != 0
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0,
             Q.IQ4_XS: Q.IQ4_NL}


def parse_type(name: str) -> Q:
    try:
        return TYPES[name.lower()]
    except KeyError:
        raise UserError(f"unknown weight type '{name}'; choose from {', '.join(TYPES)}") from None


def never_quantized(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors llama.cpp's quantizer leaves in their source type (written F32 by moecompile)."""
    return len(shape) < 2 or "_norm" in name or "ffn_gate_inp" in name


def effective_type(qtype: Q, shape: tuple[int, ...]) -> Q:
    """The type llama.cpp actually writes for a tensor whose rows have shape[-1] values."""
    row = shape[-1]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if row % block == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    if row % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    return Q.F16


def tensor_bytes(qtype: Q, shape: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def read_tensors(path: Path) -> list[tuple[str, tuple[int, ...], Q, int]]:
    """(name, numpy shape, type, bytes) of every tensor of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    return [(t.name, tuple(int(d) for d in reversed(t.shape)), Q(t.tensor_type), int(t.n_bytes))
            for t in reader.tensors]


def quantize_file(src: Path, dst: Path, types: dict[str, Q],
                  imatrix: dict[str, np.ndarray] | None = None, threads: int = 0) -> None:
    """Re-quantize the F32 GGUF `src` into `dst` with exactly `types` (GGUF name -> type;
    tensors not named keep their type)."""
    shapes = {name: shape for name, shape, _, _ in read_tensors(src)}
    unknown = sorted(set(types) - set(shapes))
    if unknown:
        raise UserError(f"no tensor(s) {', '.join(unknown[:5])} in {src.name}")
    # the fallback applied here, not left to llama.cpp: its output/token-embedding type
    # parameters skip the fallback and abort on a row that does not fit the block
    job = {"src": str(src), "dst": str(dst), "threads": threads,
           "types": {name: int(effective_type(t, shapes[name])) for name, t in types.items()}}
    imatrix_file = None
    if imatrix:
        imatrix_file = dst.with_name(dst.name + ".imatrix.npz")
        np.savez(imatrix_file, **{k: np.asarray(v, dtype=np.float32) for k, v in imatrix.items()})
        job["imatrix"] = str(imatrix_file)
    try:
        proc = subprocess.run([sys.executable, "-m", "moecompile.exporters.gguf_quant"],
                              input=json.dumps(job), capture_output=True, text=True)
    finally:
        if imatrix_file is not None:
            imatrix_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"llama.cpp's quantizer failed (exit {proc.returncode}): {tail}")


def _worker() -> int:
    """Child process: run llama_model_quantize for the job on stdin."""
    import ctypes

    import llama_cpp.llama_cpp as L

    job = json.loads(sys.stdin.read())
    params = L.llama_model_quantize_default_params()
    params.ftype = L.LLAMA_FTYPE_MOSTLY_Q8_0  # a quantized ftype, so overrides apply
    params.pure = True
    params.allow_requantize = False
    params.nthread = int(job["threads"])
    entries = sorted(job["types"].items())
    overrides = (L.llama_model_tensor_override * (len(entries) + 1))()
    keep = []
    for i, (name, qtype) in enumerate(entries):
        pattern = ("^" + re.escape(name) + "$").encode()
        keep.append(pattern)
        overrides[i].pattern = pattern
        overrides[i].type = qtype
    overrides[len(entries)].pattern = None
    params.tt_overrides = ctypes.cast(overrides, type(params.tt_overrides))
    by_name = dict(entries)
    if "output.weight" in by_name:
        params.output_tensor_type = by_name["output.weight"]
    if "token_embd.weight" in by_name:
        params.token_embedding_type = by_name["token_embd.weight"]
    if job.get("imatrix"):
        data = np.load(job["imatrix"])
        names = list(data.files)
        arrays = [np.ascontiguousarray(data[n], dtype=np.float32) for n in names]
        imat = (L.llama_model_imatrix_data * (len(names) + 1))()
        for i, (n, a) in enumerate(zip(names, arrays)):
            encoded = n.encode()
            keep.append(encoded)
            imat[i].name = encoded
            imat[i].data = a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            imat[i].size = a.size
        imat[len(names)].name = None
        keep.append(arrays)
        params.imatrix = ctypes.cast(imat, type(params.imatrix))
    rc = L.llama_model_quantize(job["src"].encode(), job["dst"].encode(), ctypes.byref(params))
    if rc != 0:
        print(f"llama_model_quantize returned {rc}", file=sys.stderr)
    return 0 if rc == 0 else 1



# ------------------------------------------------------------------------- verification numerics

class FileNumerics:
    """The numbers a quantized GGUF computes with: every weight dequantized from the file's own
    bytes (whatever llama.cpp's quantizer chose), every matmul input rounded as the CPU kernel
    for that weight type rounds it. Plugs into the reference executor like StoredNumerics."""

    def __init__(self, path: Path, planned: list):
        # imported here, not at the top: the quantizer's worker process loads this module and
        # needs no torch
        from moecompile.exporters.gguf import kernel_input

        self.input_rounding = kernel_input
        reader = gguf.GGUFReader(str(path))
        data = {t.name: t for t in reader.tensors}
        self.values: dict[int, np.ndarray] = {}
        self.types: dict[int, Q] = {}
        self.exact = True
        for p in planned:
            t = data[p.name]
            qtype = Q(t.tensor_type)
            if qtype == Q.F32:
                continue
            self.exact = False
            value = gguf.quants.dequantize(t.data, qtype).reshape(p.shape)
            parts = [value] if len(p.parts) == 1 else list(value)
            for part, v in zip(p.parts, parts):
                self.values[id(part)] = _undo(p.transform, np.asarray(v, dtype=np.float32))
                self.types[id(part)] = qtype

    def weight(self, t) -> "torch.Tensor":
        import torch

        hit = self.values.get(id(t))
        return t.value().to(torch.float32) if hit is None else torch.from_numpy(hit)

    def input(self, weight, x):
        return self.input_rounding(self.types.get(id(weight)), x)


def _undo(transform, value: np.ndarray) -> np.ndarray:
    """Invert an export-time row permutation (llama's q/k reordering) by permuting indices."""
    if transform is None:
        return value
    import torch

    index = torch.arange(value.shape[0], dtype=torch.float64)[:, None].expand(-1, value.shape[1])
    order = transform(index.clone())[:, 0].round().long().numpy()
    out = np.empty_like(value)
    out[order] = value
    return out


if __name__ == "__main__":
    sys.exit(_worker())
