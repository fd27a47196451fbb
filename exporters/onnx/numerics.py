"""What ONNX Runtime computes with for an export, for the reference executor to compute the
same: quantized weights as their blocks dequantize (recomputed on demand: quantizing a row is
deterministic and independent of its neighbours, so QMoE's stacked, interleaved experts hold
the same values), and their matmul inputs rounded to int8 blocks (accuracy level 4). Keyed by
IR path, like `Model.types`."""

from __future__ import annotations

import torch

from moecompile import ir

from . import quant as oq
from .lower import quantized


class OnnxNumerics:
    def __init__(self, model: ir.Model):
        self.quant = quantized(model)
        self.exact = not self.quant

    def weight(self, path: str, tensor: ir.Tensor) -> torch.Tensor:
        value = tensor.value().to(torch.float32)
        kind = self.quant.get(path)
        return value if kind is None else torch.from_numpy(oq.roundtrip(value.numpy(), kind))

    def input(self, path: str, x: torch.Tensor) -> torch.Tensor:
        return oq.round_activations(x) if path in self.quant else x
