"""Structured trimming: drop whole blocks, or only the MoE sublayer of blocks.

Importance as in the unified compression framework's Expert Trimming (He et al.; digest in
shared/research/compression_offload.md §1), measured once on the original model over the
calibration tokens:

- block drop: cos(h_i, h_{i+1}) between a block's input and output hidden states; the M
  blocks that change the stream least (highest similarity) go, the rest are renumbered;
- layer drop: cos(x', x' + MoE(norm(x'))) with x' the residual stream entering the FFN; the M
  MoE sublayers with the highest similarity go (attention stays). llama.cpp's graphs have no
  block without an FFN, so the GGUF exporter refuses such a model with the reason.

Each choice's cost on the calibration set (the fitness of the trimmed model, and of dropping
each single candidate) goes into the report.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from moecompile import ir
from moecompile.errors import UserError
from moecompile.runtime.executor import ReferenceExecutor

from .calib import CalibSet, build_calib
from .fitness import FitnessEvaluator


@torch.no_grad()
def similarities(model: ir.Model, calib: CalibSet, device: str = "cpu") -> tuple[list[float], list[float | None]]:
    """Per block: mean cos(block input, block output) and mean cos(x', x' + FFN) (None where
    the block has no MoE sublayer), over the calibration tokens."""
    ex = ReferenceExecutor(model, device)
    mask = calib.mask.to(ex.device)
    h, attn_mask, positions = ex.embed(calib.ids.to(ex.device), mask)
    keep = mask.bool()
    block_sim, layer_sim = [], []
    for block in model.blocks:
        start = h
        h = ex.attention_residual(block, h, attn_mask, positions)
        out = ex.ffn_residual(block, h)
        layer_sim.append(float(F.cosine_similarity(h, out, dim=-1)[keep].mean())
                         if isinstance(block.ffn, ir.MoE) else None)
        h = out
        block_sim.append(float(F.cosine_similarity(start, h, dim=-1)[keep].mean()))
    return block_sim, layer_sim


def drop_blocks(model: ir.Model, indices: list[int]) -> ir.Model:
    keep = [b for i, b in enumerate(model.blocks) if i not in set(indices)]
    return replace(model, blocks=tuple(keep))


def drop_moe_layers(model: ir.Model, indices: list[int]) -> ir.Model:
    blocks = tuple(replace(b, ffn=None, ffn_norm=None) if i in set(indices) else b
                   for i, b in enumerate(model.blocks))
    return replace(model, blocks=blocks)


def trim(model: ir.Model, kind: str, m: int, calib: str | CalibSet, calib_n: int = 32,
         device: str = "cpu") -> tuple[ir.Model, dict]:
    """kind "blocks" (--drop-blocks M) or "moe_layers" (--drop-moe-layers M)."""
    n = len(model.blocks)
    candidates = list(range(n)) if kind == "blocks" else [
        i for i, b in enumerate(model.blocks) if isinstance(b.ffn, ir.MoE)]
    what = "blocks" if kind == "blocks" else "MoE layers"
    if m < 0:
        raise UserError(f"cannot drop a negative number of {what} ({m})")
    if kind == "blocks" and m >= n:
        raise UserError(f"--drop-blocks {m}: the model has {n} blocks and must keep at least one")
    if kind == "moe_layers" and m > len(candidates):
        raise UserError(f"--drop-moe-layers {m}: the model has {len(candidates)} MoE layers")
    t0 = time.monotonic()
    report: dict = {"pass": f"drop_{kind}", "count": m}
    if m == 0:
        return model.with_history(report), report
    calib_set = calib if isinstance(calib, CalibSet) else build_calib(model, calib, calib_n)
    block_sim, layer_sim = similarities(model, calib_set, device)
    sims = block_sim if kind == "blocks" else layer_sim
    order = sorted(candidates, key=lambda i: (-sims[i], i))
    chosen = sorted(order[:m])
    apply = drop_blocks if kind == "blocks" else drop_moe_layers
    evaluator = FitnessEvaluator(model, calib_set, device)

    def cost(indices: list[int]) -> float:
        trimmed = apply(model, indices)
        logits = ReferenceExecutor(trimmed, device).logits(calib_set.ids, calib_set.mask)
        return round(evaluator.score(logits), 6)

    report.update({
        "calib": calib_set.spec,
        "dropped": chosen,
        "similarity": {str(i): round(sims[i], 6) for i in candidates},
        "fitness_before": round(evaluator.fitness({}), 6),
        "fitness_single_drop": {str(i): cost([i]) for i in candidates},
        "fitness": cost(chosen),
        "seconds": round(time.monotonic() - t0, 2),
    })
    return ir.verify(apply(model, chosen).with_history(report)), report
