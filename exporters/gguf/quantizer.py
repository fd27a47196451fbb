"""llama.cpp weight types through llama.cpp's own quantizer (`llama_model_quantize`).

K-quants and i-quants are not re-implemented here: an F32 GGUF written by moecompile is
re-quantized by llama.cpp, with one explicit type per tensor (`tt_overrides`, anchored exact
names, `pure` so llama.cpp's own mix rules stay out of the way) and optionally an importance
matrix. The quantizer runs in a child process: it aborts the whole process on some inputs.
This module is that child's entry point too, so it imports neither torch nor the IR.
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


def read_tensors(path: Path) -> list[tuple[str, tuple[int, ...], Q, int]]:
    """(name, numpy shape, type, bytes) of every tensor of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    return [(t.name, tuple(int(d) for d in reversed(t.shape)), Q(t.tensor_type), int(t.n_bytes))
            for t in reader.tensors]


def quantize_file(src: Path, dst: Path, types: dict[str, Q],
                  imatrix: dict[str, np.ndarray] | None = None, threads: int = 0) -> None:
    """Re-quantize the F32 GGUF `src` into `dst` with exactly `types` (GGUF name -> type;
    tensors not named keep their type). The types must already be what the file can hold
    (types.stored_type: the fallback applied here, not left to llama.cpp, whose
    output/token-embedding type parameters skip the fallback and abort on a row that does not
    fit the block)."""
    job = {"src": str(src), "dst": str(dst), "threads": threads,
           "types": {name: int(t) for name, t in types.items()}}
    imatrix_file = None
    if imatrix:
        imatrix_file = dst.with_name(dst.name + ".imatrix.npz")
        np.savez(imatrix_file, **{k: np.asarray(v, dtype=np.float32) for k, v in imatrix.items()})
        job["imatrix"] = str(imatrix_file)
    try:
        proc = subprocess.run([sys.executable, "-m", "moecompile.exporters.gguf.quantizer"],
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



if __name__ == "__main__":
    sys.exit(_worker())
