"""Verification: run an exported file in its real runtime and compare with the reference executor.

The reference is run on the *same numerics* the file holds: every weight is rounded to the type
it was stored in (F16, BF16, Q8_0 …), and every matmul input the way the runtime's kernels round
it, so a quantized export is judged against what it should compute, not against the float
model. Agreement with the float model is reported too, as information about what the rounding
cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import ir
from .errors import VerificationError
from .runtime import ReferenceExecutor

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

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        flips = (f", {self.tokens_over_tolerance} token(s) over it"
                 if self.tokens_over_tolerance else "")
        return (f"{self.runtime}: max|Δlogit| {self.max_abs_diff:.3g} (tolerance "
                f"{self.tolerance:.3g}{flips}), top-1 agreement {self.top1_agreement:.1%} over "
                f"{self.n_tokens} tokens; vs float model: max|Δ| {self.max_abs_diff_float:.3g}, "
                f"top-1 {self.top1_agreement_float:.1%} — {'PASS' if self.passed else 'FAIL'}")


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


def run_llama_cpp(gguf_path: Path, ids: list[int], n_gpu_layers: int = 0) -> np.ndarray:
    """Logits from llama.cpp, computed in a subprocess so an abort cannot take us down."""
    with tempfile.TemporaryDirectory(prefix="moecompile-verify-") as tmp:
        ids_file, out_file = Path(tmp, "ids.json"), Path(tmp, "logits.npy")
        ids_file.write_text(json.dumps(ids))
        proc = subprocess.run(
            [sys.executable, "-m", "moecompile.runtime.llama_worker", str(gguf_path),
             str(ids_file), str(out_file), str(n_gpu_layers)],
            capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if proc.returncode != 0 or not out_file.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise VerificationError(f"llama.cpp could not run {gguf_path.name} (exit "
                                    f"{proc.returncode}): {' | '.join(tail) or 'no message'}")
        return np.load(out_file)


def verify_gguf(model: ir.Model, gguf_path: Path, numerics, device: str | None = None,
                n_gpu_layers: int = 0) -> VerifyResult:
    """Run `gguf_path` in llama.cpp and compare with the reference on `numerics`
    (exporters.gguf.StoredNumerics: the export's weight and kernel-input rounding)."""
    ids = fixed_tokens(model.vocab, min(N_TOKENS, model.context_length))
    got = run_llama_cpp(gguf_path, ids, n_gpu_layers)
    return compare_with_reference("llama.cpp", got, model, ids, numerics, device)


def compare_with_reference(name: str, got: np.ndarray, model: ir.Model, ids: list[int],
                           numerics, device: str | None) -> VerifyResult:
    """`compare` a runtime's logits for `ids` with the reference executor on the file's
    numerics (and, when those are rounded, on the float weights too)."""
    tokens = torch.tensor([ids])
    same = ReferenceExecutor(model, device, numerics.weight, numerics.input).logits(tokens)
    floating = same if numerics.exact else ReferenceExecutor(model, device).logits(tokens)
    return compare(name, got, same[0].cpu().numpy(), floating[0].cpu().numpy(), numerics.exact)


CACHED_STEPS = 4  # tokens re-run one at a time through the KV cache during verification


def verify_onnx(model: ir.Model, onnx_path: Path, numerics, device: str | None = None) -> VerifyResult:
    """Run `onnx_path` in ONNX Runtime and compare with the reference on `numerics`
    (exporters.onnx.OnnxNumerics). The last CACHED_STEPS tokens are also decoded one at a time
    through the KV cache; their logits must match the full pass, so a broken cache fails too."""
    from .runtime.onnx_runner import OnnxDecoder

    ids = fixed_tokens(model.vocab, min(N_TOKENS, model.context_length))
    cut = len(ids) - CACHED_STEPS
    try:  # an op this onnxruntime (or provider) lacks fails here: a reason, not a crash
        decoder = OnnxDecoder(onnx_path, device)
        full = np.asarray([ids], dtype=np.int64)
        logits, cache = decoder.step(full, np.ones_like(full), decoder.empty_cache(1))
        got = logits[0]
        # keys and values at positions < cut depend on those tokens only: the prefix's cache
        cache = {name: kv[:, :, :cut] for name, kv in cache.items()}
        stepped = []
        for t in range(cut, len(ids)):
            logits, cache = decoder.step(np.asarray([[ids[t]]]), np.ones((1, t + 1), np.int64),
                                         cache)
            stepped.append(logits[0, -1])
    except MemoryError:
        raise
    except Exception as exc:  # onnxruntime's own exception types differ by version
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerificationError(f"onnxruntime could not run {onnx_path.name}: {first}") from None
    scale = max(1.0, float(np.abs(got).max()))
    cache_diff = float(np.abs(np.stack(stepped) - got[cut:]).max())
    if cache_diff > 1e-3 * scale:
        raise VerificationError(f"{onnx_path.name}: logits through the KV cache differ from the "
                                f"full pass by {cache_diff:.3g}")
    provider = decoder.session.get_providers()[0].replace("ExecutionProvider", "")
    return compare_with_reference(f"onnxruntime ({provider})", got, model, ids, numerics, device)
