"""What compression cost: task accuracy, held-out perplexity, and divergence from a base model.

Accuracy is exact match of a greedy completion (the suite's own scorer). Perplexity is over
fixed windows of held-out standard-library source. KL and top-1 agreement compare next-token
distributions of the model and its base on the same token ids (the base's tokenization), so
they measure the compression alone, not tokenizer differences.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from ..tasks import examples, score
from .backends import Backend


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def task_accuracy(backend: Backend, task: str, n: int, batch_size: int = 32,
                  progress: bool = True) -> dict:
    """Greedy exact-match accuracy on `n` test prompts (all of them where the task has fewer)."""
    exs = examples(task, "test", n, at_most=True)
    max_new = max(len(backend.encode(e.answer)) for e in exs) + 2
    correct: list[bool] = []  # per prompt, in examples() order: paired comparisons need it
    for batch in tqdm(list(_batches(exs, batch_size)), desc=f"{task}", disable=not progress,
                      leave=False):
        outs = backend.greedy([backend.encode(e.prompt) for e in batch], max_new)
        correct += [bool(score(e, backend.decode(o))) for e, o in zip(batch, outs)]
    return {"accuracy": sum(correct) / len(exs), "n": len(exs), "correct": correct}


def corpus_windows(backend: Backend, texts: list[str], window: int, max_tokens: int) -> list[list[int]]:
    """Fixed, non-overlapping token windows over the texts, up to max_tokens in all."""
    ids: list[int] = []
    for text in texts:
        ids += backend.encode(text)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    return [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def perplexity(backend: Backend, windows: list[list[int]], batch_size: int = 8,
               progress: bool = True) -> float:
    nll, count = 0.0, 0
    for batch in tqdm(list(_batches(windows, batch_size)), desc="perplexity",
                      disable=not progress, leave=False):
        for seq, logits in zip(batch, backend.logits(batch)):
            logp = _log_softmax(logits[:-1].astype(np.float64))
            nll -= float(logp[np.arange(len(seq) - 1), seq[1:]].sum())
            count += len(seq) - 1
    if not count:
        raise UserError("no perplexity windows: the corpus is shorter than one window")
    return float(np.exp(nll / count))


def divergence(model: Backend, base: Backend, sequences: list[list[int]], batch_size: int = 8,
               progress: bool = True) -> dict:
    """Mean KL(base ‖ model) of next-token distributions, and top-1 agreement."""
    if model.vocab != base.vocab:
        raise UserError(f"vocabularies differ ({model.vocab} vs {base.vocab} tokens): "
                        "KL needs the same tokens")
    kl_sum, agree, count = 0.0, 0, 0
    for batch in tqdm(list(_batches(sequences, batch_size)), desc="KL vs base",
                      disable=not progress, leave=False):
        for m, b in zip(model.logits(batch), base.logits(batch)):
            lm, lb = _log_softmax(m.astype(np.float64)), _log_softmax(b.astype(np.float64))
            kl_sum += float((np.exp(lb) * (lb - lm)).sum())
            agree += int((m.argmax(-1) == b.argmax(-1)).sum())
            count += m.shape[0]
    return {"kl": kl_sum / count, "top1_agreement": agree / count, "positions": count}
