"""Importance of each weight's input columns on the calibration data (llama.cpp's imatrix).

For every matmul weight, the mean over calibration tokens of the squared input of each column
(x_j^2): a quantizer weights the rounding error of column j by it, which is what makes low-bit
k-quants and i-quants usable. Collected per IR path, so each expert gets its own vector,
averaged over the tokens routed to it; an expert no calibration token reached has no entry
(`Importance.mean` returns None for it) and the target decides what to do (llama.cpp's
quantizer takes uniform importance). Targets turn it into their own form
(exporters/gguf/imatrix_dat.py: per GGUF tensor, experts concatenated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from moecompile import ir
from moecompile.runtime.executor import InputHook, ReferenceExecutor
from moecompile.runtime.streaming import StreamingExecutor, streams

from .calibration import CalibSet


@dataclass
class Importance:
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> sum of x_j^2 (float64)
    counts: dict[str, int] = field(default_factory=dict)  # path -> tokens seen
    sequences: int = 0
    topped_up: dict[str, int] = field(default_factory=dict)  # path -> tokens of a top-up

    def coverage(self, paths: set[str], min_tokens: int = 64) -> dict:
        """Of the experts among `paths`, those fewer than `min_tokens` calibration tokens
        reached before any top-up (path prefix -> tokens), and which were topped up."""
        rare = {}
        for path in sorted(paths):
            if ".experts." in path and path.endswith(".gate"):
                routed = self.counts.get(path, 0) - self.topped_up.get(path, 0)
                if routed < min_tokens:
                    rare[path.removesuffix(".gate")] = routed
        topped = sorted(p.removesuffix(".gate") for p in self.topped_up if p.endswith(".gate"))
        return {"min_tokens": min_tokens, "rare_experts": rare, "topped_up": topped}

    def mean(self, path: str) -> np.ndarray | None:
        """Mean squared input per column of the weight at `path` (None: never reached)."""
        if not self.counts.get(path):
            return None
        return (self.sums[path] / self.counts[path]).float().cpu().numpy()


@torch.no_grad()
def collect(model: ir.Model, calib: CalibSet, paths: set[str], device: str = "cpu",
            progress: bool = False, engine=None) -> Importance:
    """Importance of the weights at `paths`: for a model too large to hold as float32, in one
    layer-major pass (with rarely routed experts topped up, runtime/streaming.py; its shards
    on the engine's workers); otherwise one calibration sequence at a time through the
    token-major executor. Padding never counts."""
    if streams(model):
        return collect_streaming(model, calib, paths, device, progress, engine)
    out = Importance(sequences=calib.n_examples)

    def record(path: str, x: torch.Tensor) -> None:
        if path in paths and x.numel():
            flat = x.reshape(-1, x.shape[-1]).double()
            out.sums[path] = out.sums.get(path, 0) + flat.pow(2).sum(0)
            out.counts[path] = out.counts.get(path, 0) + flat.shape[0]

    ex = ReferenceExecutor(model, device, InputHook(record))
    for row in range(calib.n_examples):
        n = int(calib.mask[row].sum())
        ex.logits(calib.ids[row:row + 1, :n])
    return out


@torch.no_grad()
def collect_streaming(model: ir.Model, calib: CalibSet, paths: set[str],
                      device: str = "cpu", progress: bool = False,
                      engine=None) -> Importance:
    """`collect` in one layer-major pass over the whole calibration batch, split into token
    shards over the engine's workers (analysis/shards.py; default: this process, one shard),
    each shard resumable where it stopped (runtime/resume.py)."""
    from moecompile.distributed.engine import Engine

    from .observers import ImportanceObserver
    from .shards import stream

    observer = ImportanceObserver(paths)
    stream(engine or Engine(device), model, calib, observer,
           what=("importance", sorted(paths)), progress="importance matrix" if progress else None)
    observer.top_up(StreamingExecutor(model, device))
    return Importance(observer.sums, observer.counts, calib.n_examples, observer.topped_up)
