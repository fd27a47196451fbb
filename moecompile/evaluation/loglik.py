"""Log-likelihood of a continuation after a context, on any Backend.

One scorer behind both lm-eval's `loglikelihood` requests (harness.MoeLM) and the user's own
multiple-choice tasks (user_tasks), so the original model and its compiled file are judged by
the same arithmetic whatever runtime produced the logits: float32 logits from the backend,
log-softmax in float64, the continuation's token log-probabilities summed. `is_greedy` says
whether every continuation token was the argmax, as lm-eval defines it.

Requests that feed the model the same tokens (every one-token answer to the same question,
say) share one forward pass; the rest are batched longest first so a batch pads little.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import UserError
from .backends import Backend


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (the sums over a vocabulary stay exact enough)."""
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def encode_pair(encode: Callable[[str], list[int]], context: str,
                continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way lm-eval's TemplateLM splits them:
    trailing spaces of the context move to the continuation, the two are encoded together and
    cut after the context's own tokens (so a word keeps the token it has in running text)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    n = len(encode(context))
    return whole[:n], whole[n:]


def continuation_logprobs(backend: Backend, requests: list[tuple[list[int], list[int]]],
                          max_length: int | None = None,
                          batch_size: int = 8) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), is_greedy) for each (context ids, continuation
    ids) pair, in order. The model sees (context + continuation)[-(max_length + 1):][:-1]: a
    context longer than the window loses its oldest tokens, as in lm-eval's `hf` model."""
    max_length = max_length or backend.context
    inputs: dict[tuple[int, ...], list[int]] = {}  # model input -> indices of its requests
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            continue
        if len(cont) > max_length:
            raise UserError(f"a continuation of {len(cont)} tokens does not fit the model's "
                            f"window of {max_length}")
        if not ctx:
            raise ValueError("empty context: give the prefix (BOS/EOS) token as context")
        inputs.setdefault(tuple((ctx + cont)[-(max_length + 1):][:-1]), []).append(i)
    out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    order = sorted(inputs, key=len, reverse=True)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        for key, logits in zip(batch, backend.logits([list(k) for k in batch])):
            for i in inputs[key]:
                cont = requests[i][1]
                rows = logits[len(key) - len(cont):]
                logp = log_softmax(rows)[np.arange(len(cont)), cont]
                out[i] = (float(logp.sum()), bool((rows.argmax(-1) == cont).all()))
    return out
