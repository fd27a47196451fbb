"""Verification: compare what an exported file computes in its real runtime with the reference
executor. Each target runs its file (exporters/*/target.py); the decision is made here.

The reference is run on the *same numerics* the file holds: every weight is rounded to the type
it was stored in (F16, BF16, Q8_0 …), and every matmul input the way the runtime's kernels round
it, so a quantized export is judged against what it should compute, not against the float
model. Agreement with the float model is reported too, as information about what the rounding
cost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from . import ir
from .runtime.streaming import executor_for

N_TOKENS = 128
FLIP_SHARE = 0.02  # share of tokens a rounded export may exceed the tolerance on


@dataclass
class VerifyResult:
    runtime: str
    n_tokens: int
    max_abs_diff: float  # vs the reference on the same (rounded) weights
    top1_agreement: float
    max_abs_diff_float: float  # vs the unrounded float reference, for information
    top1_agreement_float: float
    tolerance: float
    min_top1: float
    passed: bool
    tokens_over_tolerance: int = 0  # rounded exports may have a few (routing flips)
    findings: list[str] = field(default_factory=list)  # the file's values or metadata that differ

    def with_findings(self, findings: list[str]) -> "VerifyResult":
        """This result, failed by what a check of the file's values and metadata found."""
        return replace(self, findings=list(findings), passed=self.passed and not findings)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        flips = (f", {self.tokens_over_tolerance} token(s) over it"
                 if self.tokens_over_tolerance else "")
        found = (f"; {len(self.findings)} finding(s), first: {self.findings[0]}"
                 if self.findings else "")
        return (f"{self.runtime}: max|Δlogit| {self.max_abs_diff:.3g} (tolerance "
                f"{self.tolerance:.3g}{flips}), top-1 agreement {self.top1_agreement:.1%} over "
                f"{self.n_tokens} tokens; vs float model: max|Δ| {self.max_abs_diff_float:.3g}, "
                f"top-1 {self.top1_agreement_float:.1%}{found} — "
                f"{'PASS' if self.passed else 'FAIL'}")


def fixed_tokens(vocab: int, n: int = N_TOKENS, seed: int = 0) -> list[int]:
    """A fixed, reproducible token sequence covering the vocabulary at random."""
    return [int(i) for i in np.random.default_rng(seed).integers(0, vocab, n)]


def compare(name: str, got: np.ndarray, same: np.ndarray, floating: np.ndarray, exact: bool) -> VerifyResult:
    """Compare runtime logits with the same-numerics and float references.

    Tolerances, relative to the logit scale: an all-F32 export must agree to 1e-3 on every
    token and on every argmax (llama.cpp measures ~1e-5 with an F32 KV cache). A rounded export
    is compared with a reference that rounds weights and kernel inputs the same way; what is
    left is summation order (measured ~5e-3 of the scale), held to 2e-2 of the scale — on all
    but `FLIP_SHARE` of the tokens: where two experts' router scores are nearly tied, that
    residue can flip the routing of a token, which changes its logits far more than any
    rounding (measured: one token of 128 at 8e-2 of the scale on a 256-wide random model) and
    is no defect of the file. Top-1 agreement must stay at 98% or more.
    """
    scale = max(1.0, float(np.abs(same).max()))
    tol = (1e-3 if exact else 2e-2) * scale
    min_top1 = 1.0 if exact else 0.98
    per_token = np.abs(got - same).max(-1)
    diff = float(per_token.max())
    bounded = diff if exact else float(np.quantile(per_token, 1.0 - FLIP_SHARE, method="lower"))
    top1 = float((got.argmax(-1) == same.argmax(-1)).mean())
    diff_f = float(np.abs(got - floating).max())
    top1_f = float((got.argmax(-1) == floating.argmax(-1)).mean())
    passed = bool(bounded <= tol and top1 >= min_top1 and np.isfinite(got).all())
    return VerifyResult(name, int(got.shape[0]), diff, top1, diff_f, top1_f, tol, min_top1, passed,
                        int((per_token > tol).sum()))


def compare_with_reference(name: str, got: np.ndarray, model: ir.Model, ids: list[int],
                           numerics, device: str | None) -> VerifyResult:
    """`compare` a runtime's logits for `ids` with the reference executor on the file's
    numerics (and, when those are rounded, on the float weights too); layer-major for a model
    too large to hold as float32, so memory follows one expert, not the model."""
    tokens = torch.tensor([ids])
    same = executor_for(model, device, numerics).logits(tokens)
    floating = same if numerics.exact else executor_for(model, device).logits(tokens)
    return compare(name, got, same[0].cpu().numpy(), floating[0].cpu().numpy(), numerics.exact)
