"""Confidence intervals for a score and for the difference of two models on the same documents.

Why paired: a compiled model and its original answer the same documents, and most documents
they both get right or both get wrong. The difference of two independent accuracies would
carry both models' sampling noise; the mean of per-document differences carries only the
documents where they disagree, so a real 1-point loss shows on a few hundred documents
(tools/bench_quant.py computes its intervals the same way).

Normal approximations with the sample standard deviation (ddof=1), 95%: for 0/1 outcomes the
per-model half-width is 1.96·sqrt(p(1−p)·n/(n−1))/sqrt(n), lm-eval's `mean_stderr` times 1.96.
"""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959964


def _sd(values: Sequence[float], mean: float) -> float:
    n = len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")


def mean_ci(values: Sequence[float]) -> dict:
    """Mean of per-document scores with its standard error and 95% half-width."""
    n = len(values)
    if not n:
        return {"mean": float("nan"), "stderr": float("nan"), "half_width": float("nan"), "n": 0}
    mean = sum(values) / n
    se = _sd(values, mean) / math.sqrt(n)
    return {"mean": mean, "stderr": se, "half_width": Z95 * se, "n": n}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of a − b over the same documents (in the same order), with a 95% confidence
    interval; `a_only`/`b_only` count the documents where one scores higher than the other."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same documents ({len(a)} vs {len(b)})")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    r = mean_ci(d)
    return {"diff": r["mean"], "low": r["mean"] - r["half_width"],
            "high": r["mean"] + r["half_width"], "stderr": r["stderr"],
            "a_only": sum(x > 0 for x in d), "b_only": sum(x < 0 for x in d), "n": len(d)}


def measure(model, base, tasks: list[str], n: int) -> dict:
    """The built-in suite's accuracy overall and per task, with `correct`: each prompt's
    outcome, task by task (what `paired_difference` pairs), and KL/top-1 against `base`."""
    from . import evaluate

    result = evaluate(model, base=base, tasks=tasks, n=n, progress=False)
    correct = [c for task in tasks for c in result["tasks"][task]["correct"]]
    return {"kl": result.get("kl", 0.0), "top1": result.get("top1_agreement", 1.0),
            "accuracy": sum(correct) / len(correct), "correct": correct,
            "tasks": {task: result["tasks"][task]["accuracy"] for task in tasks}}
