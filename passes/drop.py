"""Structured trimming: drop whole blocks, or only the MoE sublayer of blocks.

Importance as in the unified compression framework's Expert Trimming (He et al.; digest in
shared/research/compression_offload.md §1), measured once on the original model over the
calibration tokens (moecompile/analysis/similarity.py):

- block drop: the M blocks whose output is most similar to their input go, the rest are
  renumbered;
- MoE-layer drop: the M MoE sublayers with the highest similarity go (attention stays).
  llama.cpp's graphs have no block without an FFN, so the GGUF target refuses such a model
  with the reason.

Each choice's cost on the calibration set (the fitness of the trimmed model, and of dropping
each single candidate) goes into the report. Ensures at least one block remains; M = 0 leaves
the model untouched.
"""

from __future__ import annotations

import time
from dataclasses import replace

from moecompile import ir
from moecompile.analysis.fitness import FitnessEvaluator, StreamingFitness
from moecompile.analysis.observers import SimilarityObserver
from moecompile.analysis.shards import stream
from moecompile.analysis.similarity import similarities
from moecompile.errors import UserError
from moecompile.runtime.executor import ReferenceExecutor
from moecompile.runtime.streaming import streams

from .base import Pass, PassContext, PassResult


def drop_blocks(model: ir.Model, indices: list[int]) -> ir.Model:
    keep = [b for i, b in enumerate(model.blocks) if i not in set(indices)]
    return replace(model, blocks=tuple(keep))


def drop_moe_layers(model: ir.Model, indices: list[int]) -> ir.Model:
    blocks = tuple(replace(b, ffn=None, ffn_norm=None) if i in set(indices) else b
                   for i, b in enumerate(model.blocks))
    return replace(model, blocks=blocks)


class _Drop(Pass):
    kind = ""  # "blocks" | "moe_layers"
    flag = ""

    def __init__(self, m: int):
        if m < 0:
            raise UserError(f"{self.flag} {m}: must not be negative")
        self.m = m

    def candidates(self, model: ir.Model) -> list[int]:
        raise NotImplementedError

    def apply(self, model: ir.Model, indices: list[int]) -> ir.Model:
        raise NotImplementedError

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        candidates = self.candidates(model)
        report: dict = {"pass": self.name, "count": self.m}
        if self.m == 0:
            return PassResult(model, False, report)
        t0 = time.monotonic()
        calib = ctx.calibration(model, self.flag)
        if streams(model):
            return self._run_streaming(model, ctx, calib, candidates, report, t0)
        block_sim, layer_sim = similarities(model, calib, ctx.device)
        sims = block_sim if self.kind == "blocks" else layer_sim
        chosen = sorted(sorted(candidates, key=lambda i: (-sims[i], i))[:self.m])
        evaluator = FitnessEvaluator(model, calib, ctx.device)

        def cost(indices: list[int]) -> float:
            trimmed = self.apply(model, indices)
            logits = ReferenceExecutor(trimmed, ctx.device).logits(calib.ids, calib.mask)
            return round(evaluator.score(logits), 6)

        report.update({
            "calib": calib.spec,
            "dropped": chosen,
            "similarity": {str(i): round(sims[i], 6) for i in candidates},
            "fitness_before": round(evaluator.fitness({}), 6),
            "fitness_single_drop": {str(i): cost([i]) for i in candidates},
            "fitness": cost(chosen),
            "seconds": round(time.monotonic() - t0, 2),
        })
        return PassResult(self.apply(model, chosen), True, report)

    def _run_streaming(self, model, ctx, calib, candidates, report, t0) -> PassResult:
        """At real size: the similarities and the original's fitness in one layer-major pass,
        the chosen model's fitness in a second; the cost of each single drop would take a pass
        per candidate and is not measured here."""
        # both passes split the calibration examples over the engine's workers
        observer, before = stream(ctx.engine, model, calib, SimilarityObserver(model),
                                  StreamingFitness(calib), what=("similarity",),
                                  progress="similarities" if ctx.progress else None)
        block_sim, layer_sim = observer.similarities()
        sims = block_sim if self.kind == "blocks" else layer_sim
        chosen = sorted(sorted(candidates, key=lambda i: (-sims[i], i))[:self.m])
        trimmed = self.apply(model, chosen)
        # the trimmed model's history is the original's until this pass returns: the key
        # names what was dropped, or another drop's state would be resumed
        _, after = stream(ctx.engine, trimmed, calib, None,
                          StreamingFitness(calib, before if calib.kind == "text" else None),
                          what=("fitness", self.name, tuple(chosen)))
        report.update({
            "calib": calib.spec,
            "dropped": chosen,
            "similarity": {str(i): round(sims[i], 6) for i in candidates},
            "fitness_before": round(before.value(), 6),
            "fitness_single_drop": None,
            "fitness": round(after.value(), 6),
            "executor": "streaming",
            "seconds": round(time.monotonic() - t0, 2),
        })
        return PassResult(trimmed, True, report)

    def summary(self, report: dict) -> str | None:
        if not report["count"]:
            return None
        return (f"dropped {self.kind.replace('_', ' ')} {report['dropped']}: calibration "
                f"fitness {report['fitness']:.4f} (before {report['fitness_before']:.4f})")


class DropBlocks(_Drop):
    name, kind, flag = "drop_blocks", "blocks", "--drop-blocks"
    requires = "at least M + 1 blocks"
    ensures = "M fewer blocks, renumbered"

    def candidates(self, model: ir.Model) -> list[int]:
        if self.m >= len(model.blocks):
            raise UserError(f"--drop-blocks {self.m}: the model has {len(model.blocks)} blocks "
                            "and must keep at least one")
        return list(range(len(model.blocks)))

    def apply(self, model: ir.Model, indices: list[int]) -> ir.Model:
        return drop_blocks(model, indices)


class DropMoELayers(_Drop):
    name, kind, flag = "drop_moe_layers", "moe_layers", "--drop-moe-layers"
    requires = "at least M MoE layers"
    ensures = "M blocks without an FFN sublayer (attention kept)"

    def candidates(self, model: ir.Model) -> list[int]:
        layers = [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, ir.MoE)]
        if self.m > len(layers):
            raise UserError(f"--drop-moe-layers {self.m}: the model has {len(layers)} MoE layers")
        return layers

    def apply(self, model: ir.Model, indices: list[int]) -> ir.Model:
        return drop_moe_layers(model, indices)
