"""Fewer active experts per token: top-k reduction, plain or searched.

- plain: every MoE layer routes to k experts instead of its own top-k; nothing else changes,
  so the result equals the original model run with k experts;
- search (the default): the EEP paper's way of recovering what fewer active experts lose
  (its §4.3 / Table 3: the same search with k at evaluation time and every expert kept, so
  only the merging phase runs). Each expert may absorb a little of the others (W_EM) and the
  router's logits are adjusted linearly (W_RM on the router's rows, which GGUF can hold),
  chosen by inference-only fitness on calibration data under top-k = k. The search starts
  from the plain reduction, so on the calibration set it is never worse than it.

With `--experts N` it composes: prune first (with the model's own k), then reduce k.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from moecompile import ir
from moecompile.errors import UserError

from .calib import CalibSet, build_calib
from .eep import EEPConfig, search
from .expert_plan import apply_plans, keep_plan, moe_layers
from .fitness import FitnessEvaluator

log = logging.getLogger("moecompile")
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


def reduce_top_k(model: ir.Model, k: int, method: str = "search",
                 calib: str | CalibSet | None = None, calib_n: int = 32, seed: int = 0,
                 config: EEPConfig | None = None, device: str = "cpu",
                 progress: bool = True) -> tuple[ir.Model, dict]:
    before, n_experts = check_top_k(model, k)
    if method not in METHODS:
        raise UserError(f"unknown top-k method '{method}'; choose from {', '.join(METHODS)}")
    t0 = time.monotonic()
    plain = with_top_k(model, k)
    report: dict = {"pass": "top_k", "method": method, "top_k": k, "top_k_before": before}
    if k == before and all(model.blocks[i].ffn.top_k == k for i in moe_layers(model)):
        return model, report  # nothing to reduce: the model is returned untouched
    if k > before:
        log.warning("--top-k %d is above the model's own top-k %d", k, before)
    if calib is None:
        if method == "search":
            raise UserError("--topk-method search needs calibration data (--calib)")
        return ir.verify(plain.with_history(report)), report
    calib_set = calib if isinstance(calib, CalibSet) else build_calib(model, calib, calib_n)
    report["calib"] = calib_set.spec
    reference = FitnessEvaluator(model, calib_set, device)
    report["fitness_before"] = round(reference.fitness({}), 6)
    evaluator = FitnessEvaluator(plain, calib_set, device, router_mode="logits")
    report["fitness_plain"] = round(evaluator.fitness({}), 6)
    if method == "plain":
        result_model = plain
        report["fitness"] = report["fitness_plain"]
    else:
        layers = moe_layers(plain)
        identity = {i: keep_plan(list(range(n_experts)), n_experts) for i in layers}
        config = config or EEPConfig(seed=seed)
        config.router_mode = "logits"
        found = search(evaluator.fitness, layers, n_experts, n_experts, {"plain": identity},
                       config, progress)
        result_model = apply_plans(plain, found.plans, router_mode="logits")
        report["fitness"] = round(found.fitness, 6)
        report["evaluations"] = found.evaluations
        report["layers"] = {str(i): p.to_dict() for i, p in found.plans.items()}
    report["seconds"] = round(time.monotonic() - t0, 2)
    log.info("top-k %d -> %d (%s): calibration fitness %.4f (top-%d %.4f, plain top-%d %.4f)",
             before, k, method, report["fitness"], before, report["fitness_before"], k,
             report["fitness_plain"])
    return ir.verify(result_model.with_history(report)), report
