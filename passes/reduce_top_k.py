"""Fewer active experts per token: top-k reduction, plain or searched.

- plain: every MoE layer routes to k experts instead of its own top-k; nothing else changes,
  so the result equals the original model run with k experts;
- search (the default): the EEP paper's way of recovering what fewer active experts lose
  (its §4.3 / Table 3: the same search with k at evaluation time and every expert kept, so
  only the merging phase runs). Each expert may absorb a little of the others (W_EM) and the
  router's logits are adjusted linearly (W_RM on the router's rows, which GGUF can hold),
  chosen by inference-only fitness on calibration data under top-k = k. The search starts
  from the plain reduction, so on the calibration set it is never worse than it.

Requires MoE layers; ensures every MoE layer routes to k experts. K equal to the model's own
top-k leaves the model untouched. With `--experts N` it composes: prune first (with the
model's own k), then reduce k.
"""

from __future__ import annotations

import time
from dataclasses import replace

from moecompile import ir
from moecompile.analysis.eep import EEPConfig, search
from moecompile.analysis.expert_plan import apply_plans, keep_plan, moe_layers
from moecompile.analysis.fitness import StreamingFitness
from moecompile.analysis.population import candidates_at_size
from moecompile.analysis.shards import stream
from moecompile.errors import UserError
from moecompile.runtime.streaming import streams

from .base import Pass, PassContext, PassResult
from .prune_experts import check_one_width, search_streaming

METHODS = ("plain", "search")


def with_top_k(model: ir.Model, k: int) -> ir.Model:
    blocks = tuple(replace(b, ffn=replace(b.ffn, top_k=k)) if isinstance(b.ffn, ir.MoE) else b
                   for b in model.blocks)
    return replace(model, blocks=blocks)


def check_top_k(model: ir.Model, k: int) -> tuple[int, int]:
    layers = moe_layers(model)
    if not layers:
        raise UserError("the model has no MoE layers whose top-k could be reduced")
    counts = {model.blocks[i].ffn.n_experts for i in layers}
    before = max(model.blocks[i].ffn.top_k for i in layers)
    if k < 1 or k > min(counts):
        raise UserError(f"--top-k {k}: must be between 1 and the {min(counts)} experts per layer")
    return before, min(counts)


class ReduceTopK(Pass):
    name = "top_k"
    requires = "MoE layers"
    ensures = "every MoE layer routes to k experts"

    def __init__(self, k: int, method: str = "search", config: EEPConfig | None = None):
        if method not in METHODS:
            raise UserError(f"unknown top-k method '{method}'; choose from {', '.join(METHODS)}")
        self.k, self.method, self.config = k, method, config

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        k, method = self.k, self.method
        before, n_experts = check_top_k(model, k)
        t0 = time.monotonic()
        plain = with_top_k(model, k)
        report: dict = {"pass": self.name, "method": method, "top_k": k, "top_k_before": before}
        if k == before and all(model.blocks[i].ffn.top_k == k for i in moe_layers(model)):
            return PassResult(model, False, report)  # nothing to reduce
        if k > before:
            report["above_model_top_k"] = True
        if method == "plain" and not ctx.has_calibration:
            return PassResult(plain, True, report)  # nothing asked to measure it
        if method == "search":
            check_one_width(model, "--topk-method search")
        calib = ctx.calibration(model, "--topk-method search")
        report["calib"] = calib.spec
        if streams(model):
            return self._run_streaming(model, plain, ctx, calib, report, t0, n_experts)
        # candidates are scored where the job's engine runs them: here, or on Ray workers
        reference = ctx.engine.candidates(model, calib)
        try:
            report["fitness_before"] = round(reference.score({}), 6)
        finally:
            reference.close()
        # a text fitness is the KL to the original, not to the plain reduction being searched
        scorer = ctx.engine.candidates(plain, calib, "logits", reference=model)
        try:
            report["fitness_plain"] = round(scorer.score({}), 6)
            if method == "plain":
                result_model = plain
                report["fitness"] = report["fitness_plain"]
            else:
                layers = moe_layers(plain)
                identity = {i: keep_plan(list(range(n_experts)), n_experts) for i in layers}
                config = self.config or EEPConfig(seed=ctx.seed)
                found = search(scorer, layers, n_experts, n_experts, {"plain": identity},
                               config, "logits", ctx.progress)
                result_model = apply_plans(plain, found.plans, router_mode="logits")
                report["fitness"] = round(found.fitness, 6)
                report["evaluations"] = found.evaluations
                report["search_batch"] = config.batch
                report["layers"] = {str(i): p.to_dict() for i, p in found.plans.items()}
        finally:
            scorer.close()
        report["seconds"] = round(time.monotonic() - t0, 2)
        return PassResult(result_model, True, report)

    def _run_streaming(self, model, plain, ctx, calib, report, t0, n_experts) -> PassResult:
        """At real size: the original and the plain reduction scored by layer-major passes;
        the search (EEP's merging phase, from the plain reduction) scores its candidates a
        generation per layer-major pass, its time measured and printed before it starts
        (prune_experts.search_streaming). A text fitness is the KL to the original's top-K."""
        _, before = stream(ctx.engine, model, calib, None, StreamingFitness(calib),
                           what=("fitness",))
        reference = before if calib.kind == "text" else None
        report.update({"fitness_before": round(before.value(), 6), "executor": "streaming"})
        if self.method == "plain":
            # the reduced model's history is the original's until this pass returns: the key
            # names the change, or the two passes would resume each other's states
            _, after = stream(ctx.engine, plain, calib, None, StreamingFitness(calib, reference),
                              what=("fitness", self.name, self.k))
            report.update({"fitness_plain": round(after.value(), 6),
                           "fitness": round(after.value(), 6),
                           "seconds": round(time.monotonic() - t0, 2)})
            return PassResult(plain, True, report)
        layers = moe_layers(plain)
        identity = {i: keep_plan(list(range(n_experts)), n_experts) for i in layers}
        config = self.config or EEPConfig(seed=ctx.seed)
        scorer = candidates_at_size(ctx.engine, plain, calib, "logits", reference, config.batch)
        searched: dict = {}
        try:
            plans = search_streaming({"plain": identity}, scorer, layers, n_experts, n_experts,
                                     config, "logits", ctx.progress, searched)
            fitness_plain, fitness = scorer.score(identity), scorer.score(plans)
        finally:
            scorer.close()
        report.update({"fitness_plain": round(fitness_plain, 6),
                       "fitness": round(fitness, 6), **searched,
                       "layers": {str(i): p.to_dict() for i, p in plans.items()},
                       "seconds": round(time.monotonic() - t0, 2)})
        return PassResult(apply_plans(plain, plans, router_mode="logits"), True, report)

    def summary(self, report: dict) -> str:
        k, before = report["top_k"], report["top_k_before"]
        line = f"top-k {before} -> {k} ({report['method']})"
        if k == before:
            line += ": unchanged"
        if "fitness" in report:
            line += (f": calibration fitness {report['fitness']:.4f} (top-{before} "
                     f"{report['fitness_before']:.4f}, plain top-{k} "
                     f"{report['fitness_plain']:.4f})")
        if report.get("above_model_top_k"):
            line += f"\nnote: --top-k {k} is above the model's own top-k {before}"
        return line
