"""How much the model's output moves when some weights take another type: the measurement
behind `--quant auto`.

For each unit of choice (a target's group: a GGUF stacked tensor group, an ONNX expert …) and
each candidate type, the KL of the model's next-token distributions to the original is
measured on the calibration data through the reference executor, with only that unit's
weights replaced by what the file would hold. Calibration tokens reach each expert as often as
real use does, so an expert's loss is already weighted by how much it is used. Targets supply
the units and the rounded values; nothing here knows a file format.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from moecompile import ir
from moecompile.runtime.executor import ReferenceExecutor, SourceNumerics

from .calibration import CalibSet


class CalibKL:
    """KL(original || the model with some weights replaced), mean over the calibration tokens:
    the original's log-probabilities are computed once, each replacement costs one forward
    pass of the reference executor on the replacing numerics."""

    def __init__(self, model: ir.Model, calib: CalibSet, device: str = "cpu"):
        self.model, self.calib, self.device = model, calib, device
        self.mask = calib.mask.bool()
        with torch.no_grad():
            self.ref = torch.log_softmax(self._logits(None), -1)

    def _logits(self, numerics):
        executor = ReferenceExecutor(self.model, self.device, numerics)
        return executor.logits(self.calib.ids, self.calib.mask)

    def __call__(self, numerics) -> float:
        with torch.no_grad():
            return self._kl(self._logits(numerics))

    def of_model(self, other: ir.Model) -> float:
        """KL(original || another model of the same vocabulary, e.g. one with fewer or
        narrower experts), float weights."""
        with torch.no_grad():
            return self._kl(ReferenceExecutor(other, self.device).logits(self.calib.ids,
                                                                         self.calib.mask))

    def _kl(self, logits: torch.Tensor) -> float:
        logp = torch.log_softmax(logits, -1)
        kl = (self.ref.exp() * (self.ref - logp)).sum(-1)[self.mask].mean()
        return max(0.0, float(kl))


class Replaced(SourceNumerics):
    """Float weights, except the paths in `paths`, whose values come from `value(path,
    tensor)` (None: keep the float value)."""

    def __init__(self, paths: set[str], value: Callable[[str, ir.Tensor], torch.Tensor | None]):
        self.paths, self.value = paths, value

    def weight(self, path: str, tensor: ir.Tensor) -> torch.Tensor:
        hit = self.value(path, tensor) if path in self.paths else None
        return tensor.value() if hit is None else hit


def measure(model: ir.Model, calib: CalibSet, units: dict[str, list[str]],
            candidates: list[str], rounded, device: str = "cpu",
            progress: bool = True) -> dict[str, dict[str, float]]:
    """unit -> type -> KL. `rounded(type)` is a context manager giving `value(path, tensor)`,
    the weight as a file of that type holds it (None where the type leaves it as it is)."""
    kl = CalibKL(model, calib, device)
    out: dict[str, dict[str, float]] = {u: {} for u in units}
    with tqdm(total=len(candidates) * len(units), desc="quant sensitivity",
              disable=not progress) as bar:
        for name in candidates:
            with rounded(name) as value:
                for unit, paths in units.items():
                    out[unit][name] = kl(Replaced(set(paths), value))
                    bar.update(1)
    return out
