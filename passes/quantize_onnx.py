"""`--quant auto` for the ONNX target: precision chosen per expert by measured sensitivity.

ONNX holds every weight as its own tensor, so the unit of choice is finer than GGUF's stacked
layer tensors: each routed expert (gate, up, down together), each layer's attention, each
shared expert or dense MLP, and the output head. For each unit and each candidate (f32, int8,
int4 in blocks of 32, exporters/onnx_quant.py), the KL of the model's next-token
distributions to the original is measured on the calibration data through the reference
executor with only that unit's weights replaced by what the file would hold; calibration
tokens reach each expert as often as real use does, so a rarely used expert is cheap to
squeeze. Then `quantize.choose` takes the least summed loss that fits the bytes.
"""

from __future__ import annotations

import re

import torch
from tqdm import tqdm

from moecompile import ir
from moecompile.exporters import onnx as onnx_export
from moecompile.exporters import onnx_quant as oq

from .quantize import CalibKL, choose

CANDIDATES = ("f32", "int8", "int4")


def unit_of(path: str) -> str:
    """blocks.3.attn.q -> blocks.3.attn; blocks.3.ffn.experts.5.down -> blocks.3.ffn.experts.5."""
    m = re.match(r"(blocks\.\d+\.(?:attn|ffn\.experts\.\d+|ffn\.shared|ffn))\.", path)
    return m.group(1) if m else path


def units(model: ir.Model, weights: dict[int, str]) -> dict[str, list[ir.Tensor]]:
    """The quantizable linear weights (id -> IR path) grouped into units of choice."""
    by_id = {id(t): t for _, t in model.tensors()}
    out: dict[str, list[ir.Tensor]] = {}
    for key, path in weights.items():
        t = by_id[key]
        if oq.quantizable(t.shape):
            out.setdefault(unit_of(path), []).append(t)
    return out


def unit_bytes(tensors: list[ir.Tensor], kind: str) -> int:
    return sum(oq.stored_bytes(t.numel, None if kind == "f32" else kind) for t in tensors)


def sensitivity(model: ir.Model, groups: dict[str, list[ir.Tensor]], calib, device="cpu",
                progress: bool = True) -> dict[str, dict[str, float]]:
    """KL(original || model with one unit at one type), mean over the calibration tokens."""
    kl = CalibKL(model, calib, device)
    out: dict[str, dict[str, float]] = {g: {"f32": 0.0} for g in groups}
    steps = (len(CANDIDATES) - 1) * len(groups)
    with tqdm(total=steps, desc="quant sensitivity", disable=not progress) as bar:
        for kind in CANDIDATES[1:]:
            for g, tensors in groups.items():
                held = {id(t): torch.from_numpy(oq.roundtrip(t.value().float().numpy(), kind))
                        for t in tensors}
                out[g][kind] = kl(lambda t, held=held: held.get(id(t), t.value()))
                bar.update(1)
    return out


def allocate(model: ir.Model, groups: dict[str, list[ir.Tensor]], sens, weight_budget: int):
    """(IR tensor id -> "int8"/"int4", unit -> type, weight bytes, predicted KL)."""
    fixed = onnx_export.weight_bytes(model, {}) - sum(unit_bytes(ts, "f32") for ts in groups.values())
    unit_types, total, predicted = choose(
        sens, lambda g, kind: unit_bytes(groups[g], kind), fixed, weight_budget)
    quant = {id(t): kind for g, kind in unit_types.items() if kind != "f32" for t in groups[g]}
    return quant, unit_types, total, predicted
