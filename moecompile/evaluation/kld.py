"""Perplexity on a text, and how far compression moved the next-token distribution: the
report of llama.cpp's `llama-perplexity --kl-divergence`, in its convention, so numbers here
read like the ones users already know (research digest shared/research/lm-eval.md §4; llama.cpp
tools/perplexity/perplexity.cpp, PR #5076):

- the text is cut into consecutive chunks of n_ctx tokens (of the base model's tokenization:
  both models are scored on the same token ids, so the report measures the compression, not a
  tokenizer difference); the first token of a chunk is replaced by BOS where the model has one;
- each chunk is run from an empty cache and only its second half is scored (logit rows
  n_ctx/2 … n_ctx−2 predicting tokens n_ctx/2+1 … n_ctx−1), so every scored token has at
  least n_ctx/2 tokens of context;
- per scored token: KL(base‖model) = Σ_v p_base(v)·(ln p_base(v) − ln p_model(v)) over the
  whole vocabulary (llama.cpp skips terms with ln p_base < −16 because it stores the base in
  16 bits; we have the base's float32 logits, so nothing is skipped), whether both argmaxes
  agree ("same top p"), and Δp = p_model(next) − p_base(next) of the actual next token;
- reported: PPL of each and their ratio, mean KL ± sd/sqrt(n−1), its max, 99.9/99/95/90%
  percentiles, median, 10/5/1% and min, same top p ± sqrt(p(1−p)/(n−1)), RMS Δp (in %).
"""

from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from .backends import Backend
from .loglik import log_softmax

PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0)


def text_chunks(backend: Backend, text: str, n_ctx: int, max_chunks: int | None = None,
                source: str = "text") -> list[list[int]]:
    """Consecutive chunks of n_ctx tokens of the text (a shorter tail is dropped)."""
    if n_ctx < 4:
        raise UserError(f"--ctx {n_ctx}: a chunk needs at least 4 tokens")
    ids = backend.encode(text)
    count = len(ids) // n_ctx
    if max_chunks:
        count = min(count, max_chunks)
    if not count:
        raise UserError(f"{source}: {len(ids)} tokens, fewer than one chunk of {n_ctx} "
                        "(give a longer text or a smaller --ctx)")
    chunks = [ids[i * n_ctx:(i + 1) * n_ctx] for i in range(count)]
    if backend.bos is not None:
        for chunk in chunks:
            chunk[0] = backend.bos
    return chunks


def _scored(logits: np.ndarray, chunk: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities of the scored rows (second half) and the tokens they predict."""
    first = len(chunk) // 2
    return log_softmax(logits[first:len(chunk) - 1]), np.asarray(chunk[first + 1:])


def text_report(model: Backend, chunks: list[list[int]], base: Backend | None = None,
                batch_size: int = 4, progress: bool = True) -> dict:
    """PPL of the model on the chunks' second halves; with `base`, also the base's PPL and the
    KL / same-top / Δp statistics of the model against it. Per-chunk values are kept."""
    if base is not None and model.vocab != base.vocab:
        raise UserError(f"vocabularies differ ({model.vocab} vs {base.vocab} tokens): KL needs "
                        "the same tokens")
    nll_model, nll_base, kl, same, dp, per_chunk = [], [], [], [], [], []
    for start in tqdm(range(0, len(chunks), batch_size), desc="text", disable=not progress,
                      leave=False):
        batch = chunks[start:start + batch_size]
        base_logits = base.logits(batch) if base is not None else [None] * len(batch)
        for chunk, m, b in zip(batch, model.logits(batch), base_logits):
            lm, target = _scored(m, chunk)
            rows = np.arange(len(target))
            nm = -lm[rows, target]
            nll_model.append(nm)
            entry = {"nll_model": float(nm.sum()), "tokens": len(target)}
            if b is not None:
                lb, _ = _scored(b, chunk)
                nb = -lb[rows, target]
                k = (np.exp(lb) * (lb - lm)).sum(-1)
                nll_base.append(nb)
                kl.append(k)
                same.append(lm.argmax(-1) == lb.argmax(-1))
                dp.append(np.exp(-nm) - np.exp(-nb))
                entry.update(nll_base=float(nb.sum()), kl_mean=float(k.mean()))
            per_chunk.append(entry)
    nm = np.concatenate(nll_model)
    report = {"n_ctx": len(chunks[0]), "chunks": len(chunks), "tokens": int(nm.size),
              "ppl": float(np.exp(nm.mean())), "per_chunk": per_chunk}
    if base is not None:
        report.update(_against_base(nm, np.concatenate(nll_base), np.concatenate(kl),
                                    np.concatenate(same), np.concatenate(dp)))
    return report


def _against_base(nm: np.ndarray, nb: np.ndarray, kl: np.ndarray, same: np.ndarray,
                  dp: np.ndarray) -> dict:
    n = kl.size
    p = float(same.mean())
    return {
        "base_ppl": float(np.exp(nb.mean())),
        "ppl_ratio": float(np.exp(nm.mean() - nb.mean())),
        "kl": {"mean": float(kl.mean()),
               "stderr": float(kl.std() / math.sqrt(n - 1)) if n > 1 else 0.0,
               "max": float(kl.max()),
               **{f"p{q:g}": float(np.percentile(kl, q)) for q in PERCENTILES},
               "min": float(kl.min())},
        "same_top": {"p": p, "stderr": math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0},
        "rms_delta_p": float(np.sqrt((dp ** 2).mean())),
        "mean_delta_p": float(dp.mean()),
    }
