"""How much each block, and each block's MoE sublayer, changes the residual stream.

The unified MoE-compression framework's Expert Trimming (He et al.; digest in
shared/research/compression_offload.md §1) drops what changes the stream least, measured once
on the original model over the calibration tokens:

- block: cos(h_i, h_{i+1}) between a block's input and output hidden states;
- MoE sublayer: cos(x', x' + MoE(norm(x'))) with x' the residual stream entering the FFN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecompile import ir
from moecompile.runtime.executor import ReferenceExecutor

from .calibration import CalibSet


@torch.no_grad()
def similarities(model: ir.Model, calib: CalibSet, device: str = "cpu") -> tuple[list[float], list[float | None]]:
    """Per block: mean cos(block input, block output) and mean cos(x', x' + FFN) (None where
    the block has no MoE sublayer), over the calibration tokens."""
    ex = ReferenceExecutor(model, device)
    mask = calib.mask.to(ex.device)
    h, attn_mask, positions = ex.embed(calib.ids.to(ex.device), mask)
    keep = mask.bool()
    block_sim, layer_sim = [], []
    for i, block in enumerate(model.blocks):
        start = h
        h = ex.attention_residual(i, h, attn_mask, positions)
        out = ex.ffn_residual(i, h)
        layer_sim.append(float(F.cosine_similarity(h, out, dim=-1)[keep].mean())
                         if isinstance(block.ffn, ir.MoE) else None)
        h = out
        block_sim.append(float(F.cosine_similarity(start, h, dim=-1)[keep].mean()))
    return block_sim, layer_sim
