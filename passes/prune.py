"""The expert-pruning pass: keep N experts per MoE layer, chosen by EEP or a baseline.

    model, report = prune_experts(model, n_keep=4, method="eep", calib="add,sort")

Every method has the same interface and the same calibration data, so they compare fairly;
EEP's search starts from the baselines' choices. The report (kept experts per layer, merge
weights, fitness of every method on the calibration set, the search's history) goes into the
model's pass history, hence into the JSON report beside the output and the GGUF metadata.
"""

from __future__ import annotations

import logging
import time

from moecompile import ir
from moecompile.errors import UserError

from . import prune_baselines
from .calib import CalibSet, build_calib
from .eep import EEPConfig, search
from .expert_plan import apply_plans, moe_layers
from .fitness import FitnessEvaluator

log = logging.getLogger("moecompile")

METHODS = ("eep",) + prune_baselines.BASELINES
HISTORY_POINTS = 50  # fitness history kept in the report, evenly subsampled


def parse_search_budget(text: str | None) -> tuple[int, float | None]:
    """'400' (evaluations) or '90s' / '2m' (time) -> (evaluations, seconds)."""
    if text is None:
        return EEPConfig.evaluations, None
    t = text.strip().lower()
    try:
        if t.endswith("s"):
            return 10**9, float(t[:-1])
        if t.endswith("m"):
            return 10**9, 60 * float(t[:-1])
        value = int(t)
    except ValueError:
        value = 0
    if value < 1 or value > 10**7:
        raise UserError(f"--search-budget '{text}': expected a number of evaluations (e.g. 400) "
                        "or a time (e.g. 90s, 5m)")
    return value, None


def check_request(model: ir.Model, n_keep: int, method: str) -> int:
    layers = moe_layers(model)
    if not layers:
        raise UserError("the model has no MoE layers to prune")
    counts = {model.blocks[i].ffn.n_experts for i in layers}
    if method not in METHODS:
        raise UserError(f"unknown pruning method '{method}'; choose from {', '.join(METHODS)}")
    if n_keep < 1 or n_keep > min(counts):
        raise UserError(f"--experts {n_keep}: must be between 1 and the model's "
                        f"{min(counts)} experts per layer")
    if any(model.blocks[i].ffn.router_map is not None for i in layers):
        raise UserError("the model's experts were already pruned with a router map")
    return max(counts)


def prune_experts(model: ir.Model, n_keep: int, method: str, calib: str | CalibSet,
                  calib_n: int = 32, seed: int = 0, config: EEPConfig | None = None,
                  router_mode: str = "onehot", device: str = "cpu",
                  progress: bool = True) -> tuple[ir.Model, dict]:
    n_experts = check_request(model, n_keep, method)
    t0 = time.monotonic()
    calib_set = calib if isinstance(calib, CalibSet) else build_calib(model, calib, calib_n)
    log.info("calibration: %s (%d examples, %d tokens, fitness: %s)", calib_set.spec,
             calib_set.n_examples, calib_set.n_tokens,
             "exact-match accuracy" if calib_set.kind == "tasks" else "-KL to the original")
    layers = moe_layers(model)
    io = prune_baselines.collect_layer_io(model, calib_set, device)
    evaluator = FitnessEvaluator(model, calib_set, device, router_mode=router_mode)
    report: dict = {"pass": "prune_experts", "method": method, "experts": n_keep,
                    "experts_before": n_experts, "calib": calib_set.spec,
                    "calib_examples": calib_set.n_examples, "fitness_kind":
                    "accuracy" if calib_set.kind == "tasks" else "neg_kl", "seed": seed}
    report["fitness_unpruned"] = round(evaluator.fitness({}), 6)

    if method == "eep":
        starts = {name: prune_baselines.choose(name, model, io, n_keep, seed, device)
                  for name in prune_baselines.BASELINES}
        config = config or EEPConfig(seed=seed)
        config.router_mode = router_mode
        result = search(evaluator.fitness, layers, n_experts, n_keep, starts, config, progress)
        plans = result.plans
        report["baseline_fitness"] = {k: round(v, 6) for k, v in result.initial.items()}
        report["phase1_best"] = round(result.phase1_best, 6)
        report["evaluations"] = result.evaluations
        report["cache_hits"] = evaluator.cache_hits
        step = max(1, len(result.history) // HISTORY_POINTS)
        report["history"] = [[n, round(f, 6)] for n, f in result.history[::step]]
        report["router_mode"] = router_mode
    else:
        plans = prune_baselines.choose(method, model, io, n_keep, seed, device)
    fitness = evaluator.fitness(plans)
    report["fitness"] = round(fitness, 6)
    report["seconds"] = round(time.monotonic() - t0, 2)
    report["layers"] = {str(layer): plan.to_dict() for layer, plan in plans.items()}
    pruned = apply_plans(model, plans, router_mode=router_mode)
    top_k = model.blocks[layers[0]].ffn.top_k
    if n_keep < top_k:
        log.warning("top-k %d clamped to %d: only %d experts are kept per layer", top_k, n_keep,
                    n_keep)
        report["top_k_clamped"] = [top_k, n_keep]
    log.info("pruned to %d experts per layer by %s: calibration fitness %.4f (unpruned %.4f)",
             n_keep, method, fitness, report["fitness_unpruned"])
    return ir.verify(pruned.with_history(report)), report

