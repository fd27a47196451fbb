"""Run a GGUF file in llama.cpp (llama-cpp-python) and get its logits, in a subprocess.

llama.cpp aborts the whole process on some malformed files (e.g. expert_used_count >
expert_count), so the compiler never loads a file it just wrote in its own process:
`run_llama_cpp` runs `python -m moecompile.runtime.llama_worker MODEL.gguf IDS.json OUT.npy`
and reads OUT.npy. IDS.json holds a list of sequences, each evaluated from an empty cache.

The KV cache is F32 (type_k = type_v = 0): with the default F16 cache llama.cpp differs from an
f32 reference by ~1e-2, which would hide real errors of that size.

Weights stay in llama.cpp's plain CPU buffers (`use_extra_bufts` off): the extra buffer types
(weight repacking, and on Intel CPUs with AMX the AMX kernels) compute with kernels of their own
that the reference does not mirror, and on a CPU that reports AMX where the kernel has not
granted it (measured in this project's sandbox: Xeon with amx_int8) the AMX path kills the
process (SIGSEGV/SIGILL) on the first Q8_0 or k-quant matmul.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SMALL_FILE = 256 << 20  # below this a file is evaluated on one thread (see `open_llama`)


def open_llama(model_path: str, n_ctx: int, n_gpu_layers: int = 0, threads: int | None = None):
    """A llama.cpp context for measuring: every position's logits, F32 KV cache. `threads`
    None: one for a small file, llama.cpp's default otherwise — on shared cores a small model's
    threads mostly wait for each other (measured: 0.2 s instead of 2.6-10 s per evaluation,
    the same logits bit for bit)."""
    if threads is None and os.path.getsize(model_path) < SMALL_FILE:
        threads = 1
    extra = {} if threads is None else {"n_threads": threads, "n_threads_batch": threads}
    return plain_llama(model_path=model_path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                       logits_all=True, verbose=False, type_k=0, type_v=0,
                       n_gpu_layers=n_gpu_layers, seed=0, **extra)


def plain_llama(**kwargs):
    """llama_cpp.Llama(**kwargs) with the weights in plain CPU buffers (no repacking, no AMX;
    see the module's docstring). Llama() takes no such argument, so its default model
    parameters are swapped for the duration of the call."""
    import llama_cpp
    from llama_cpp import llama as high_level

    default = high_level.llama_cpp.llama_model_default_params

    def plain():
        params = default()
        params.use_extra_bufts = False
        return params

    high_level.llama_cpp.llama_model_default_params = plain
    try:
        return llama_cpp.Llama(**kwargs)
    finally:
        high_level.llama_cpp.llama_model_default_params = default


def sequence_logits(llm, ids: list[int]) -> np.ndarray:
    """float32 logits (len(ids), vocab) of one sequence evaluated from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def run(model_path: str, sequences: list[list[int]], n_gpu_layers: int = 0) -> np.ndarray:
    """(B, T, V) logits of equally long sequences, each from an empty cache."""
    llm = open_llama(model_path, max(max(len(s) for s in sequences), 8), n_gpu_layers)
    return np.stack([sequence_logits(llm, ids) for ids in sequences])


def run_llama_cpp(gguf_path: Path, sequences: list[list[int]],
                  n_gpu_layers: int = 0) -> np.ndarray:
    """(B, T, V) logits from llama.cpp of `sequences`, each from an empty cache, computed in a
    subprocess so an abort cannot take us down."""
    from ..errors import VerificationError

    with tempfile.TemporaryDirectory(prefix="moecompile-verify-") as tmp:
        ids_file, out_file = Path(tmp, "ids.json"), Path(tmp, "logits.npy")
        ids_file.write_text(json.dumps([[int(i) for i in s] for s in sequences]))
        proc = subprocess.run(
            [sys.executable, "-m", "moecompile.runtime.llama_worker", str(gguf_path),
             str(ids_file), str(out_file), str(n_gpu_layers)],
            capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if proc.returncode != 0 or not out_file.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise VerificationError(f"llama.cpp could not run {gguf_path.name} (exit "
                                    f"{proc.returncode}): {' | '.join(tail) or 'no message'}")
        return np.load(out_file)


def main(argv: list[str]) -> int:
    model_path, ids_file, out_file = argv[:3]
    n_gpu_layers = int(argv[3]) if len(argv) > 3 else 0
    with open(ids_file) as f:
        sequences = json.load(f)
    np.save(out_file, run(model_path, sequences, n_gpu_layers))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
