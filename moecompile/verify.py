"""Verification: compare what an exported file computes in its real runtime with the reference
executor. Each target runs its file (exporters/*/target.py); the decision is made here.

The reference is run on the *same numerics* the file holds: every weight is rounded to the type
it was stored in (F16, BF16, Q8_0 …), every matmul input the way the runtime's kernels round it,
and (GGUF) norms and RoPE tables as ggml computes them, so a quantized export is judged against
what it should compute, not against the float model. Agreement with the float model is reported
too, as information about what the rounding cost.

What is left between a correct file and that reference is accumulation order (2–7e-7 of each
product), and it cannot be closed. Rounded numerics amplify it: an activation rounding step
turns a last-bit difference into a whole step now and then, attention spreads that to every
later token, and a near-tied router turns it into another expert. On one long sequence nearly
every token of a correct Q8_0/Q4_K export is disturbed (median 1e-2), which is why a fixed
tolerance both rejected correct files (40 of 120 on a grid of families, weight scales and types)
and passed a wrong norm epsilon (11 of 60). So:

- the input is many short sequences (16 of 8 tokens, each from an empty cache): a flip disturbs
  only the rest of its own sequence, and most tokens of a correct file stay float32-close;
- the verdict is relative to a *null*: the same numerics computed again by the reference with
  every matmul and attention product jittered by 3e-7 (two seeds), a second legitimate
  computation of the file. How far the null strays is what flips, cascades and near-ties do to
  this model on this input; a file fails when clearly more of its tokens are disturbed than the
  null's, or when its median token is clearly worse.

Measured on the grid (4 families x 5 weight scales x F32/F16/Q8_0/Q4_K/ONNX int8/int4, and 9
injected bugs on Q8_0, Q4_K and ONNX int4): 0 of 120 correct files failed, 0 of 405 wrong ones
passed; the thresholds below say what they rest on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from . import ir
from .runtime.streaming import executor_for, streams

N_SEQUENCES = 16
SEQUENCE_LENGTH = 8  # positions 1..7 exercise RoPE and attention; a flip spoils at most 7
NULL_SIGMA = 3e-7  # relative jitter of each product: the op-level residual measured in llama.cpp
NULL_SEEDS = (0, 1)
# A token is disturbed when its error exceeds both the float32 floor and TAU_K x the null's
# 25th percentile. TAU_FLOOR: an F32 export's worst token on the grid is 2.1e-5, disturbed tokens
# sit at 1e-3..0.3. TAU_K: an F16 export's every token carries small F16-step flips (median
# 2-5e-4, the null alike): tau lands near 2e-3, above that band. The 25th percentile, not the
# median: at OLMoE-1B-7B's width about half the tokens are disturbed and the null's median jumps
# between float32 level and the cascade level from seed to seed (with it, a wrong epsilon passed).
TAU_FLOOR, TAU_K, TAU_QUANTILE = 1e-4, 4.0, 0.25
# Sequences, not tokens, are the independent samples (a cascade takes the rest of its sequence):
# the share may exceed the null's by two standard errors of the difference of the two shares
# (the runtime's over its sequences, the null's over as many per seed) and never by less than
# two whole sequences. Correct files exceeded the null by at most +0.15 (Q4_K) on the machine
# the grid was first run on, +0.22 on an AVX-512 Xeon (Qwen3-MoE, weights N(0, 0.15), Q8_0:
# over a slack that counted the runtime's sampling error alone); injected bugs by at least
# +0.41 (two experts swapped in one layer); with this slack, on the Xeon, the closest correct
# file stayed 0.02 under it and the closest wrong one (a negated router row, Q4_K) 0.02 over,
# so the magnitude test below is the one with room.
SLACK_SEQUENCES, SLACK_SIGMAS = 2.0, 2.0
# The median token may be at most MAGNITUDE_K x the null's median: correct files reached 0.98x
# it on the first machine (0.35x the bar on the AVX-512 Xeon), every injected bug at least 139x
# the bar (147x there).
MAGNITUDE_K = 3.0


@dataclass
class VerifyResult:
    runtime: str
    n_sequences: int
    n_tokens: int
    passed: bool
    reason: str  # the decisive figures, and the worst tokens as (sequence, position, error)
    share_disturbed: float  # tokens whose error exceeds tau
    share_null: float  # the same share for the nulls
    slack: float
    tau: float
    median_error: float  # relative error of the centred logits, per token
    magnitude_bar: float
    max_error: float
    top1_agreement: float  # reported, not decisive: a near-tie's argmax may go either way
    top1_decisive: float  # where the reference's margin exceeds twice what the nulls move
    max_abs_diff: float
    max_abs_diff_float: float | None = None  # vs the unrounded float model (None: not run)
    top1_agreement_float: float | None = None
    findings: list[str] = field(default_factory=list)  # the file's values or metadata that differ

    def with_findings(self, findings: list[str]) -> "VerifyResult":
        """This result, failed by what a check of the file's values and metadata found."""
        return replace(self, findings=list(findings), passed=self.passed and not findings)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        floating = ("" if self.top1_agreement_float is None else
                    f"; vs float model: max|Δ| {self.max_abs_diff_float:.3g}, top-1 "
                    f"{self.top1_agreement_float:.1%}")
        found = (f"; {len(self.findings)} finding(s), first: {self.findings[0]}"
                 if self.findings else "")
        return (f"{self.runtime}: {self.reason}; top-1 agreement {self.top1_agreement:.1%} over "
                f"{self.n_tokens} tokens in {self.n_sequences} sequences{floating}{found} — "
                f"{'PASS' if self.passed else 'FAIL'}")


def fixed_tokens(vocab: int, n: int, seed: int = 0) -> list[int]:
    """A fixed, reproducible token sequence covering the vocabulary at random."""
    return [int(i) for i in np.random.default_rng(seed).integers(0, vocab, n)]


def verification_tokens(model: ir.Model) -> np.ndarray:
    """The verification input: (N_SEQUENCES, SEQUENCE_LENGTH) fixed random token ids, each row
    run from an empty cache."""
    length = min(SEQUENCE_LENGTH, model.context_length)
    return np.random.default_rng(0).integers(0, model.vocab, (N_SEQUENCES, length))


def relative_errors(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per token, |Δ - mean Δ| / |ref - mean ref|: the relative error of the centred logits
    (a constant shift changes no probability), scale-free between flat and peaked tokens."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    delta = got - ref
    delta -= delta.mean(-1, keepdims=True)
    centred = ref - ref.mean(-1, keepdims=True)
    return (np.linalg.norm(delta, axis=-1)
            / np.maximum(np.linalg.norm(centred, axis=-1), 1e-30)).ravel()


def decide(name: str, got: np.ndarray, same: np.ndarray, nulls: list[np.ndarray],
           floating: np.ndarray | None = None) -> VerifyResult:
    """The verdict on runtime logits `got` (B, T, V) against the same-numerics reference and
    its nulls (module docstring); `floating` (the float model) is reported only."""
    n_seq, length = got.shape[:2]
    flat_got, flat_same = got.reshape(-1, got.shape[-1]), same.reshape(-1, same.shape[-1])
    agree = flat_got.argmax(-1) == flat_same.argmax(-1)
    base = dict(runtime=name, n_sequences=int(n_seq), n_tokens=int(n_seq * length),
                top1_agreement=float(agree.mean()))
    if floating is not None:
        flat_float = floating.reshape(flat_same.shape)
        base.update(max_abs_diff_float=float(np.abs(flat_got - flat_float).max()),
                    top1_agreement_float=float((flat_got.argmax(-1)
                                                == flat_float.argmax(-1)).mean()))
    finite = np.isfinite(flat_got).all(-1)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        return VerifyResult(**base, passed=False, reason=(
            f"non-finite logits at sequence {first // length} position {first % length} "
            f"({int((~finite).sum())} token(s))"), share_disturbed=1.0, share_null=0.0, slack=0.0,
            tau=0.0, median_error=float("inf"), magnitude_bar=0.0, max_error=float("inf"),
            top1_decisive=0.0, max_abs_diff=float("inf"))
    errors = relative_errors(got, same)
    null = np.concatenate([relative_errors(n, same) for n in nulls])
    tau = max(TAU_FLOOR, TAU_K * float(np.quantile(null, TAU_QUANTILE)))
    share, share_null = float((errors > tau).mean()), float((null > tau).mean())
    # both shares are estimates: the runtime's over n_seq sequences, the null's over n_seq per
    # seed, so the slack is two standard errors of their difference
    slack = max(SLACK_SEQUENCES / n_seq,
                SLACK_SIGMAS * float(np.sqrt(share_null * (1 - share_null)
                                             * (1 / n_seq + 1 / (n_seq * len(nulls))))))
    median = float(np.median(errors))
    bar = MAGNITUDE_K * max(float(np.median(null)), TAU_FLOOR / TAU_K)
    ordered = np.sort(flat_same, -1)
    moved = np.max([np.abs(n.reshape(flat_same.shape) - flat_same).max(-1) for n in nulls], 0)
    decisive = ordered[:, -1] - ordered[:, -2] > 2 * moved
    worst = ", ".join(f"({i // length}, {i % length}, {errors[i]:.2g})"
                      for i in np.argsort(errors)[::-1][:2])
    figures = (f"{share:.0%} of tokens off by more than {tau:.2g} (null {share_null:.0%}, "
               f"slack {slack:.0%}), median error {median:.2g} (bar {bar:.2g}), worst "
               f"(sequence, position, error) {worst}")
    if share - share_null > slack:
        reason = "more tokens disturbed than rounding explains: " + figures
    elif median > bar:
        reason = "the typical token is further off than rounding explains: " + figures
    else:
        reason = figures
    return VerifyResult(
        **base, passed=share - share_null <= slack and median <= bar, reason=reason,
        share_disturbed=share, share_null=share_null, slack=float(slack), tau=tau,
        median_error=median, magnitude_bar=bar, max_error=float(errors.max()),
        top1_decisive=float(agree[decisive].mean()) if decisive.any() else 1.0,
        max_abs_diff=float(np.abs(flat_got - flat_same).max()))


@dataclass
class References:
    """The reference's logits for the verification input on a file's numerics, its nulls, and
    (for the report, where cheap) the float model's."""

    same: np.ndarray
    nulls: list[np.ndarray]
    floating: np.ndarray | None


def references(model: ir.Model, tokens: np.ndarray, numerics, device: str | None) -> References:
    """The reference on the file's numerics and its nulls for `tokens` (B, T); layer-major for
    a model too large to hold as float32, so memory follows one expert, not the model. The
    float model is computed only where that is cheap (a model that streams would be read once
    more for it)."""
    ids = torch.as_tensor(np.asarray(tokens))

    def logits(numerics=None, jitter=None) -> np.ndarray:
        return executor_for(model, device, numerics, jitter).logits(ids).cpu().numpy()

    same = logits(numerics)
    nulls = [logits(numerics, (NULL_SIGMA, seed)) for seed in NULL_SEEDS]
    return References(same, nulls, same if numerics.exact else None if streams(model)
                      else logits())


def judge(name: str, got: np.ndarray, refs: References,
          also: dict[str, np.ndarray] | None = None) -> VerifyResult:
    """`decide` on a runtime's logits (B, T, V); `also`: other ways the runtime computed the
    same tokens (label -> logits, e.g. through its KV cache), judged by the same rule: the first
    that fails is the verdict."""
    result = decide(name, got, refs.same, refs.nulls, refs.floating)
    for label, other in (also or {}).items():
        more = decide(name, other, refs.same, refs.nulls, refs.floating)
        if result.passed and not more.passed:
            return replace(more, reason=f"{label}: {more.reason}")
    return result


def compare_with_reference(name: str, got: np.ndarray, model: ir.Model, tokens: np.ndarray,
                           numerics, device: str | None,
                           also: dict[str, np.ndarray] | None = None) -> VerifyResult:
    """`judge` a runtime's logits for `tokens` against the `references` on `numerics`."""
    return judge(name, got, references(model, tokens, numerics, device), also)
