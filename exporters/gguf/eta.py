"""How long `--quant auto` (and `--budget`) will take on a model that streams, said before the
sensitivity starts.

At real size that time is spent quantizing: the layer-local sensitivity rounds every
candidate type of a sample of each layer, and the mixes it measures end to end round most of
the model again (ggml's k-quants with an importance matrix: 10-20 M values/s on
two cores; OLMoE-1B-7B holds 6.9 G). The rest is passes over the calibration tokens, whose
cost the importance matrix's pass has just measured, and the verification. So the estimate
counts the values each stage rounds, at rates measured on one of the model's own weights per
type, plus its passes at the importance pass's rate per token:

- sensitivity: each candidate type of every attention, dense-MLP, embedding and head unit,
  and of the sampled experts of each stacked expert group (sensitivity.sampled_count), plus
  one pass, plus for each type the sub-layers it computes again
  (sensitivity.recomputed_values), at the importance pass's time per value and token;
- probes: one pass per group of units (a kind of sub-layer in a depth band,
  sensitivity.probe_groups) and one for the reference; they round nothing new (a probe puts
  only the sampled experts at the probe type, rounded and kept already, rounded.py);
- mixes: which mixes are measured is known only once the sensitivity is; each rounds only
  what no earlier stage kept, so the estimate takes the experts not sampled rounded once at
  the type whose uniform file fits the budget, and one pass for each of three mixes (measured
  at 16 OLMoE layers, 5 GB: one distinct mix, 390 s, estimated 350 s);
- once the sensitivity has chosen the mixes, `mixes_known` counts what each of them rounds
  that is not kept yet (at 16 OLMoE layers the start's guess, the unsampled experts once at
  the uniform-fit type, was 316 s for 541 s taken: the mixes held iq4_xs, quantized at half
  q4_k's rate, and rounded some groups at two types);
- the file copies the kept bytes; verification (the reference and its two nulls, each reading
  the checkpoint and dequantizing the file block by block) costs about three importance
  passes (measured at 16 OLMoE layers: 100 s against a 32 s pass).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from moecompile import ir
from moecompile.analysis.sensitivity import (LOCAL_TOKENS, probe_groups, sampled_count,
                                             unit_kind)

from . import ggml
from .types import ggml as ggml_type

MIXES = 3  # choose_measured's mixes, at most
MIX_ROUNDINGS = 1  # the experts' values rounded anew over the mixes, as whole-model roundings
VERIFY_PASSES = 3  # the reference and its two nulls


def quantize_rates(sample: torch.Tensor, imatrix: np.ndarray | None,
                   types: list[str]) -> dict[str, float]:
    """Seconds per value of rounding `sample` (rows, n) to each type, as ggml does it here
    (every core, the importance vector when there is one)."""
    values = np.ascontiguousarray(sample.to(torch.float32).numpy())
    out = {}
    for name in types:
        qtype = int(ggml_type(name))
        start = time.perf_counter()
        ggml.dequantize(ggml.quantize(values, qtype, imatrix), qtype, values.shape)
        out[name] = (time.perf_counter() - start) / values.size
    return out


def pass_values(model: ir.Model) -> float:
    """Weight values a token goes through in the importance pass: every matrix but the
    embedding (a lookup) and the output head (whose logits it never computes), a MoE's
    experts in the share top_k/n_experts."""
    total = 0.0
    for path, tensor in model.tensors():
        if len(tensor.shape) != 2 or path in ("embed", "lm_head"):
            continue
        if ".experts." in path:
            moe = model.blocks[int(path.split(".")[1])].ffn
            total += tensor.numel * moe.top_k / moe.n_experts
        else:
            total += tensor.numel
    return total


def checked_pass(pass_seconds: float, calib_tokens: int, held_tokens: int) -> float:
    """Seconds of one end-to-end pass of a mix (or of the reference) over the measurement
    tokens and the held-out ones, at the importance pass's rate per token."""
    per_token = pass_seconds / max(calib_tokens, 1)
    return per_token * (min(LOCAL_TOKENS, calib_tokens) + min(LOCAL_TOKENS, held_tokens))


def estimate(units: dict[str, list[str]], numel: dict[str, int], rates: dict[str, float],
             fit: str, pass_seconds: float, calib_tokens: int, held_tokens: int, *,
             recomputed: float, passed: float, types: int) -> dict[str, float]:
    """Seconds of each stage (see the module's docstring). `units`: the IR paths of each unit
    (one path per expert in a stacked expert unit); `numel`: values per IR path; `rates`:
    seconds per value of each candidate type; `pass_seconds`: the importance pass over
    `calib_tokens` tokens; `held_tokens`: the held-out calibration's, on which the reference
    and the mixes are measured too; `recomputed`: values a token goes through when the
    sensitivity measures one type (sensitivity.recomputed_values), `types` times, against
    `passed` a token goes through in the importance pass (pass_values)."""
    every_type = sum(rates.values())
    per_token = pass_seconds / max(calib_tokens, 1)
    one_pass = per_token * min(LOCAL_TOKENS, calib_tokens)
    checked = checked_pass(pass_seconds, calib_tokens, held_tokens)
    sensitivity = one_pass * (1 + types * recomputed / max(passed, 1.0))
    unsampled = 0
    for paths in units.values():
        values = sum(numel[p] for p in paths)
        if unit_kind(paths) == "experts":
            share = sampled_count(len(paths), numel[paths[0]]) / len(paths)
            sensitivity += share * values * every_type
            unsampled += (1 - share) * values
        else:
            sensitivity += values * every_type
    probes = one_pass * len(probe_groups(units)) + checked
    mixes = MIX_ROUNDINGS * unsampled * rates[fit] + MIXES * checked
    verification = VERIFY_PASSES * pass_seconds
    return {"sensitivity": sensitivity, "probes": probes, "mixes": mixes,
            "file and verification": verification}


def mixes_known(mixes: list[dict[str, str]], units: dict[str, list[str]],
                numel: dict[str, int], rates: dict[str, float], kept, pass_seconds: float,
                calib_tokens: int, held_tokens: int = 0) -> tuple[float, int]:
    """(seconds, values to round) of measuring `mixes` (group -> type) end to end: what each
    rounds that neither an earlier stage kept (`kept(path, type)`) nor an earlier mix rounded,
    at the type's rate (16-bit types are casts: not counted), and a pass each."""
    seconds = len(mixes) * checked_pass(pass_seconds, calib_tokens, held_tokens)
    values, seen = 0, set()
    for mix in mixes:
        for group, name in mix.items():
            if name not in rates:
                continue
            for path in units[group]:
                if (path, name) not in seen and not kept(path, name):
                    seen.add((path, name))
                    seconds += numel[path] * rates[name]
                    values += numel[path]
    return seconds, values
