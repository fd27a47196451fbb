"""Timing a GGUF in llama.cpp the way the benchmarks compare files: in a fresh process, a prompt
from an empty cache, then greedy decoding one token at a time; weights in llama.cpp's plain CPU
buffers, as everything here runs them (runtime/llama_worker.py: no repacking, no AMX)."""

PROMPT_TOKENS = 128
DECODE_TOKENS = 64
LLAMA_TIMER = """
import sys, time, json
import numpy as np
from moecompile.runtime.llama_worker import plain_llama
path, prompt_n, decode_n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
n_ctx = prompt_n + decode_n + 8  # n_batch = n_ctx: llama-cpp-python keeps n_batch rows of scores
llm = plain_llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                  n_batch=n_ctx, logits_all=False, verbose=False)
rng = np.random.default_rng(0)
prompt = [int(t) for t in rng.integers(10, llm.n_vocab() - 10, prompt_n)]
t0 = time.perf_counter(); llm.eval(prompt); t1 = time.perf_counter()
for _ in range(decode_n):
    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
t2 = time.perf_counter()
print(json.dumps({"prompt_tps": prompt_n / (t1 - t0), "decode_tps": decode_n / (t2 - t1)}))
"""
