"""Expert pruning: keep N experts per MoE layer, chosen by EEP or a baseline.

    PruneExperts(4, "eep").run(model, PassContext(calib=calib))

Every method has the same interface and the same calibration data, so they compare fairly;
EEP's search (moecompile/analysis/eep.py, arXiv 2407.00945) starts from the baselines'
choices (moecompile/analysis/baselines.py), so on the calibration set it is never worse than
them. The report (kept experts per layer, merge weights, fitness of every method on the
calibration set, the search's history) goes into the model's pass history, hence into the JSON
report beside the output and the GGUF metadata.

Requires MoE layers whose router has one row per expert (no earlier router map); ensures every
MoE layer has `n_keep` experts and top-k at most `n_keep`.
"""

from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm

from moecompile import ir
from moecompile.analysis import baselines
from moecompile.analysis.eep import EEPConfig, search
from moecompile.analysis.expert_plan import apply_plans, keep_plan, moe_layers
from moecompile.analysis.fitness import StreamingFitness
from moecompile.analysis.population import PopulationScorer, candidates_at_size
from moecompile.analysis.observers import Observers, RouterObserver
from moecompile.analysis.shards import stream
from moecompile.errors import UserError
from moecompile.runtime.streaming import Observer, streams

from .base import Pass, PassContext, PassResult

METHODS = ("eep",) + baselines.BASELINES
HISTORY_POINTS = 50  # fitness history kept in the report, evenly subsampled
# a default-length EEP search at real size expected to take longer is refused with the ways
# to bound it (a search the user sized with --search-budget runs, its ETA printed)
ETA_LIMIT = 3600.0


def _finite(value: float) -> float | None:
    """A fitness for the report: None where the search never got there (-inf is no JSON)."""
    return round(value, 6) if math.isfinite(value) else None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def check_request(model: ir.Model, n_keep: int, method: str) -> int:
    """The experts per layer before pruning; UserError for a request the model cannot meet."""
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
    check_one_width(model, "--experts")
    return max(counts)


def check_one_width(model: ir.Model, flag: str) -> None:
    """Merging and comparing experts needs one width per layer: refuse a layer whose experts
    were slimmed to different widths (slim after pruning, the CLI's order)."""
    for i in moe_layers(model):
        widths = sorted({ex.width for ex in model.blocks[i].ffn.experts})
        if len(widths) > 1:
            raise UserError(f"{flag}: layer {i}'s experts have widths {widths}; merging or "
                            "comparing experts needs one width per layer, so prune before "
                            "slimming to different widths")


class PruneExperts(Pass):
    name = "prune_experts"
    requires = "MoE layers with one router row per expert"
    ensures = "n_keep experts per MoE layer, top-k clamped to n_keep"

    def __init__(self, n_keep: int, method: str = "eep", config: EEPConfig | None = None,
                 router_mode: str = "onehot"):
        self.n_keep, self.method, self.router_mode = n_keep, method, router_mode
        self.config = config

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if streams(model):
            return self._run_streaming(model, ctx)
        n_experts = check_request(model, self.n_keep, self.method)
        n_keep, method, router_mode = self.n_keep, self.method, self.router_mode
        t0 = time.monotonic()
        calib = ctx.calibration(model, "--experts")
        layers = moe_layers(model)
        io = baselines.collect_layer_io(model, calib, ctx.device)
        # candidates are scored where the job's engine runs them: here, or on Ray workers
        scorer = ctx.engine.candidates(model, calib, router_mode)
        try:
            report: dict = {"pass": self.name, "method": method, "experts": n_keep,
                            "experts_before": n_experts, "calib": calib.spec,
                            "calib_examples": calib.n_examples, "fitness_kind":
                            "accuracy" if calib.kind == "tasks" else "neg_kl", "seed": ctx.seed}
            report["fitness_unpruned"] = round(scorer.score({}), 6)
            if method == "eep":
                starts = {name: baselines.choose(name, model, io, n_keep, ctx.seed, ctx.device)
                          for name in baselines.EEP_STARTS}
                config = self.config or EEPConfig(seed=ctx.seed)
                result = search(scorer, layers, n_experts, n_keep, starts, config,
                                router_mode, ctx.progress)
                plans = result.plans
                report.update(_search_report(result, config, router_mode))
            else:
                plans = baselines.choose(method, model, io, n_keep, ctx.seed, ctx.device)
            report["fitness"] = round(scorer.score(plans), 6)
        finally:
            scorer.close()
        report["seconds"] = round(time.monotonic() - t0, 2)
        report["layers"] = {str(layer): plan.to_dict() for layer, plan in plans.items()}
        pruned = apply_plans(model, plans, router_mode=router_mode)
        top_k = model.blocks[layers[0]].ffn.top_k
        if n_keep < top_k:
            report["top_k_clamped"] = [top_k, n_keep]
        return PassResult(pruned, True, report)

    def _run_streaming(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """The same pass for a model too large to hold as float32: one layer-major pass of
        the original gathers the router statistics and its fitness (for reconstruct and EEP's
        starts, every subset's layer-local error: NAEE's search), the baseline chooses from
        them, a second pass measures the pruned model's fitness. EEP scores its candidates
        layer-major, a generation per pass (`search_streaming`, analysis/population.py)."""
        n_experts = check_request(model, self.n_keep, self.method)
        t0 = time.monotonic()
        calib = ctx.calibration(model, "--experts")
        router = RouterObserver()
        observer: Observer = router
        subsets = None
        if self.method in ("reconstruct", "eep"):
            subsets = baselines.ReconstructionObserver(model, calib, self.n_keep, ctx.seed)
            observer = Observers(router, subsets)
        # both passes split the calibration examples over the engine's workers
        _, original = stream(ctx.engine, model, calib, observer, StreamingFitness(calib),
                             what=("router",) if subsets is None else
                             ("router", "subsets", self.n_keep, ctx.seed),
                             progress="router statistics" if ctx.progress else None)
        starts = {name: self._streaming_choice(name, model, router, subsets, ctx)
                  for name in (baselines.EEP_STARTS if self.method == "eep" else [self.method])}

        config = self.config or EEPConfig(seed=ctx.seed)
        scorer = candidates_at_size(ctx.engine, model, calib, self.router_mode,
                                    original if calib.kind == "text" else None, config.batch,
                                    search=self.method == "eep")
        search_report: dict = {}
        try:
            if self.method == "eep":
                plans = search_streaming(starts, scorer, moe_layers(model), n_experts,
                                         self.n_keep, config, self.router_mode, ctx.progress,
                                         search_report)
            else:
                plans = starts[self.method]
            fitness = scorer.score(plans)
        finally:
            scorer.close()
        report = {"pass": self.name, "method": self.method, "experts": self.n_keep,
                  "experts_before": n_experts, "calib": calib.spec,
                  "calib_examples": calib.n_examples,
                  "fitness_kind": "accuracy" if calib.kind == "tasks" else "neg_kl",
                  "seed": ctx.seed, "executor": "streaming",
                  "fitness_unpruned": round(original.value(), 6),
                  "fitness": round(fitness, 6),
                  "coverage": router.coverage(),
                  "seconds": round(time.monotonic() - t0, 2),
                  "layers": {str(layer): plan.to_dict() for layer, plan in plans.items()},
                  **search_report}
        pruned = apply_plans(model, plans, router_mode=self.router_mode)
        top_k = model.blocks[moe_layers(model)[0]].ffn.top_k
        if self.n_keep < top_k:
            report["top_k_clamped"] = [top_k, self.n_keep]
        return PassResult(pruned, True, report)

    def _streaming_choice(self, method: str, model: ir.Model, router, subsets,
                          ctx: PassContext) -> dict:
        """A baseline's plans from the streaming pass's statistics."""
        if method == "reconstruct":
            return {layer: keep_plan(subsets.best(layer), model.blocks[layer].ffn.n_experts)
                    for layer in moe_layers(model)}
        return baselines.choose(method, model, baselines.stats_from(router), self.n_keep,
                                ctx.seed, ctx.device)

    def summary(self, report: dict) -> str:
        line = (f"pruned to {report['experts']} of {report['experts_before']} experts per layer "
                f"by {report['method']}: calibration fitness {report['fitness']:.4f} (unpruned "
                f"{report['fitness_unpruned']:.4f}")
        if "baseline_fitness" in report:
            best = max(report["baseline_fitness"].items(), key=lambda kv: kv[1])
            line += f"; best baseline {best[0]} {best[1]:.4f}"
        line += f"; {report['seconds']:.0f} s)"
        if "top_k_clamped" in report:
            before, after = report["top_k_clamped"]
            line += f"\ntop-k {before} clamped to {after}: only {after} experts are kept per layer"
        return line


def search_streaming(starts: dict, scorer, layers: list[int], n_experts: int, n_keep: int,
                     config: EEPConfig, router_mode: str, progress: bool, report: dict) -> dict:
    """EEP (or the top-k search, n_keep == n_experts) at real size, scored by `scorer`
    (population.candidates_at_size: a generation per layer-major pass, or a pass per
    candidate on workers). The first start is scored alone before the search (which then
    finds it scored), so the search's time is printed before it starts, from a pass of one
    (an upper bound: a generation shares its reads and common layers), and a default-length
    search that would take longer than `ETA_LIMIT` is refused with what bounds it instead
    (--search-budget, or reconstruct: NAEE's layer-local search). Fills `report`; returns the
    plans found."""
    t0 = time.monotonic()
    scorer.score(next(iter(starts.values())))
    each_seconds = time.monotonic() - t0
    population = isinstance(scorer, PopulationScorer)
    each = (f"the search at this size scores a generation of {config.batch} candidates per "
            f"layer-major pass (~{each_seconds:.0f} s measured for one alone)" if population else
            f"the search at this size scores each candidate with one streaming pass "
            f"(~{each_seconds:.0f} s measured)")
    merging_from = 0 if n_keep == n_experts else config.discrete_evals
    if config.seconds is not None:
        eta, line = config.seconds, f"{each}: the search runs for {_duration(config.seconds)}"
    else:
        eta = config.evaluations * each_seconds
        line = f"{each}: {config.evaluations} evaluations take about {_duration(eta)}"
        if population:
            # measured on 4 OLMoE layers (tools/bench_population.py): 7.9 s an evaluation in
            # generations (8.2 for the top-k search's merges), 9.75 s for one alone
            line += " or less (a generation shares its reads and its candidates' common layers)"
        elif config.evaluations > merging_from:
            # measured at 16 OLMoE layers: a merging candidate 75 s, a one-hot one 30 s
            after = f", after the first {merging_from}," if merging_from else ""
            line += (f" or more (merging candidates{after} read every expert they mix: up to "
                     "2.5x as long)")
    if eta > ETA_LIMIT and not config.asked:
        fits = max(1, int(ETA_LIMIT // max(each_seconds, 1e-9)))
        alternative = ("use --prune-method reconstruct (NAEE's layer-local search, one pass)"
                       if n_keep < n_experts else "use --topk-method plain")
        raise UserError(f"{line}; bound the search with --search-budget (e.g. {fits} or 60m) "
                        f"or {alternative}")
    if progress:
        tqdm.write(line, file=sys.stderr)
    result = search(scorer, layers, n_experts, n_keep, starts, config, router_mode, progress)
    timing = {"seconds_per_evaluation": round(result.seconds / max(result.evaluations, 1), 2),
              "eta_seconds": round(eta, 1)}
    if population:
        timing.update(generations=scorer.fitness.generations,
                      started_from_kept_states=scorer.fitness.cache_hits)
    report.update(_search_report(result, config, router_mode, **timing))
    return result.plans


def _search_report(result, config: EEPConfig, router_mode: str, **timing) -> dict:
    """What a search adds to the pass's report, in memory and at real size alike (`timing`:
    the streaming search's time per evaluation and ETA, and the generations it scored and the
    candidates that started from a kept state, between the counts and the history, where the
    report has always held them)."""
    step = max(1, len(result.history) // HISTORY_POINTS)
    return {"baseline_fitness": {k: round(v, 6) for k, v in result.initial.items()},
            "phase1_best": _finite(result.phase1_best), "evaluations": result.evaluations,
            "search_batch": config.batch, **timing,
            "history": [[n, round(f, 6)] for n, f in result.history[::step]],
            "router_mode": router_mode}
