"""Measuring a (compressed) model: the engine behind tools/eval.py.

evaluate() below is the built-in suite's engine (used by the benchmarks in tools/). tools/eval.py
runs compare.compare(): lm-eval tasks through harness.MoeLM (benchmarks.py, lm-eval imported only
there), the user's JSONL tasks (user_tasks.py), the llama-perplexity-style text report (kld.py),
paired intervals (paired.py) and the memory check for HF folders (memory.py).
"""

from __future__ import annotations

from .backends import Backend, open_backend
from .metrics import corpus_windows, divergence, perplexity, task_accuracy

__all__ = ["Backend", "open_backend", "evaluate", "format_table"]

PPL_WINDOW = 128
PPL_TOKENS = 8192


def evaluate(model: "str | Backend", base: "str | Backend | None" = None, tasks: list[str] | None = None, n: int = 200,
             ppl: bool = False, batch_size: int = 32, progress: bool = True) -> dict:
    """Accuracy per task, optional perplexity, and KL / top-1 agreement against `base`."""
    from ..tasks import corpus_texts, examples

    backend = model if isinstance(model, Backend) else open_backend(model)
    result: dict = {"model": backend.name, "tasks": {}}
    for task in tasks or []:
        result["tasks"][task] = task_accuracy(backend, task, n, batch_size, progress)
    window = min(PPL_WINDOW, backend.context)
    if ppl:
        windows = corpus_windows(backend, corpus_texts("test"), window, PPL_TOKENS)
        result["perplexity"] = perplexity(backend, windows, progress=progress)
    if base is not None:
        reference = base if isinstance(base, Backend) else open_backend(base)
        sequences = corpus_windows(reference, corpus_texts("test"), window, PPL_TOKENS // 4)
        for task in tasks or []:
            sequences += [reference.encode(e.prompt + e.answer)
                          for e in examples(task, "test", min(n, 32))]
        result["base"] = reference.name
        result.update(divergence(backend, reference, sequences, progress=progress))
    return result


def format_table(result: dict) -> str:
    lines = [f"model: {result['model']}", "", "| task | accuracy | n |", "|---|---|---|"]
    for task, r in result["tasks"].items():
        lines.append(f"| {task} | {r['accuracy']:.3f} | {r['n']} |")
    if "perplexity" in result:
        lines.append(f"\nperplexity (held-out stdlib source): {result['perplexity']:.3f}")
    if "kl" in result:
        lines.append(f"vs base {result['base']}: KL {result['kl']:.5f}, top-1 agreement "
                     f"{result['top1_agreement']:.4f} over {result['positions']} positions")
    return "\n".join(lines)
