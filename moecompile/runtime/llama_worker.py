"""Run a GGUF file in llama.cpp (llama-cpp-python) and save its logits; meant for a subprocess.

llama.cpp aborts the whole process on some malformed files (e.g. expert_used_count >
expert_count), so the compiler never loads a file it just wrote in its own process: it runs
`python -m moecompile.runtime.llama_worker MODEL.gguf IDS.json OUT.npy` and reads OUT.npy.

The KV cache is F32 (type_k = type_v = 0): with the default F16 cache llama.cpp differs from an
f32 reference by ~1e-2, which would hide real errors of that size.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def run(model_path: str, ids: list[int], n_gpu_layers: int = 0) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=model_path, n_ctx=max(len(ids), 8), n_batch=max(len(ids), 8),
                n_ubatch=max(len(ids), 8), logits_all=True, verbose=False, type_k=0, type_v=0,
                n_gpu_layers=n_gpu_layers, seed=0)
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def main(argv: list[str]) -> int:
    model_path, ids_file, out_file = argv[:3]
    n_gpu_layers = int(argv[3]) if len(argv) > 3 else 0
    with open(ids_file) as f:
        ids = json.load(f)
    np.save(out_file, run(model_path, ids, n_gpu_layers))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
