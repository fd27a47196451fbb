"""Comparing two models prompt by prompt: every configuration answers the same prompts, so
their accuracies differ by a paired difference whose confidence interval is far tighter than
two independent ones (only prompts where exactly one of the two is right move it)."""

from __future__ import annotations

import math

from . import evaluate
from .backends import Backend

Z95 = 1.959964


def measure(model: "str | Backend", base: "Backend | None", tasks: list[str], n: int) -> dict:
    """evaluate() on `tasks`: accuracy overall and per task, plus `correct`: each prompt's
    outcome, task by task."""
    result = evaluate(model, base=base, tasks=tasks, n=n, progress=False)
    correct = [c for task in tasks for c in result["tasks"][task]["correct"]]
    return {"kl": result.get("kl", 0.0), "top1": result.get("top1_agreement", 1.0),
            "accuracy": sum(correct) / len(correct), "correct": correct,
            "tasks": {task: result["tasks"][task]["accuracy"] for task in tasks}}


def paired_difference(a: list[bool], b: list[bool]) -> dict:
    """Accuracy of a minus b over the same prompts, with a 95% confidence interval from the
    per-prompt differences (normal approximation; only prompts where exactly one of the two is
    right move it)."""
    d = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    half = Z95 * sd / math.sqrt(len(d))
    return {"diff": mean, "low": mean - half, "high": mean + half,
            "a_only": d.count(1), "b_only": d.count(-1), "n": len(d)}
