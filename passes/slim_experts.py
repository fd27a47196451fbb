"""Expert slimming: each expert keeps its most important intermediate neurons.

    SlimExperts("0.75", "wanda").run(model, PassContext(calib=calib))

The unified MoE-compression framework (He et al., arXiv 2406.02500; digest in
shared/research/compression_offload.md §1) splits compression into expert trimming (drop
experts, layers, blocks: passes/prune_experts.py, drop.py) and expert slimming (make each
expert smaller). Its slimming methods are unstructured or 2:4 sparsity, which neither
llama.cpp nor a portable ONNX graph turns into a smaller or faster file. This pass is the
structured form: whole neurons go (rows of gate and up, columns of down), so every expert's
FFN is narrower, the file smaller and decoding reads fewer bytes.

Per expert, neurons are ranked by an importance from calibration statistics
(moecompile/analysis/neurons.py: Wanda-style down-column norm x routed RMS activation, its
activation-only and weight-only factors, or random) and the top `width` are kept; then, unless
`refit="none"`, the down projection is refitted by ridge least squares so its output on the
kept neurons reconstructs the original expert's output (ridge towards the plain slice, chosen
on held-out calibration examples; the slice where refitting does not help there). The refit is
a lazy recipe (`ir.MixColumns`): the weights are read when a target writes them.

With `general_mix` (the CLI's `--width-data calib+mix`, its default) the importances and the
refit are computed on the calibration set and as many chunks of the built-in general text mix:
fitted to task prompts alone, a width drops what those prompts leave idle and text outside them
uses (bundled model, width 192: KL 0.016 against 0.0008 on Python source).

Routed experts take `width`; shared experts and dense MLPs take `shared_width` (None: left
alone — always-on MLPs carry every token, and the evidence is to keep them high). The result
of each expert (kept count, a hash of the kept neurons, the ridge and the reconstruction
error with and without refit) and the calibration fitness before and after go into the
report, hence into the GGUF metadata.

Requires MLPs at least as wide as asked; ensures each slimmed MLP has exactly its requested
width and unchanged ones are untouched (a width equal to the current one changes nothing).
Per-layer and per-expert widths (a dict) are the Python API's; a target refuses what its
runtime cannot hold (GGUF: one width for the whole model).

At real size (a model that streams, runtime/streaming.py) the statistics and the original's
fitness come from one layer-major pass (analysis/neurons.py `NeuronObserver`) and the slimmed
model's fitness from a second, as for expert pruning; the choice is the same as token-major.
The refit holds F x F float64 statistics per slimmed MLP (16 F^2 bytes: 16 MiB at OLMoE's
F=1024, so 16 GiB for its 1024 experts) and is refused above REFIT_STATS with the alternative,
--width-refit none, whose importances need F numbers per MLP.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import replace

from moecompile import ir
from moecompile.analysis import neurons
from moecompile.analysis.calibration import CalibSet, build_calib
from moecompile.analysis.fitness import FitnessEvaluator, StreamingFitness
from moecompile.analysis.shards import stream
from moecompile.errors import UserError
from moecompile.runtime.streaming import streams
from moecompile.sizes import format_size
from moecompile.tasks.calibration import DEFAULT
from moecompile.widths import WidthRequest, parse

from .base import Pass, PassContext, PassResult

METHODS = neurons.IMPORTANCES
REFITS = ("lsq", "none")
FULL_STATS = 1 << 30  # bytes of F x F statistics collected without a refit, for its report
REFIT_STATS = 8 << 30  # bytes of F x F statistics the refit may hold (float64, two halves)
SHARED_STATS = 1 << 30  # bytes of statistics kept in a `memo` for the next width (below)


def requested_widths(model: ir.Model, width, shared_width=None) -> dict[str, int]:
    """IR prefix of each MLP to slim -> its new width. `width` applies to routed experts: a
    WidthRequest (or its text), or a dict {layer: width} / {(layer, expert): width} of neuron
    counts; `shared_width` to shared experts and dense MLPs (a WidthRequest or text)."""
    out: dict[str, int] = {}
    moe = [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, ir.MoE)]
    if width is not None:
        if not moe:
            raise UserError("the model has no MoE layers whose experts could be slimmed")
        if isinstance(width, dict):
            for key, w in width.items():
                layer, experts = (key, None) if isinstance(key, int) else key
                if layer not in moe:
                    raise UserError(f"layer {layer} is not an MoE layer")
                n = model.blocks[layer].ffn.n_experts
                for e in ([experts] if experts is not None else range(n)):
                    if not 0 <= e < n:
                        raise UserError(f"layer {layer} has no expert {e}")
                    full = model.blocks[layer].ffn.experts[e].width
                    if not 1 <= int(w) <= full:
                        raise UserError(f"layer {layer} expert {e}: width {w} outside 1..{full}")
                    out[f"blocks.{layer}.ffn.experts.{e}"] = int(w)
        else:
            request = width if isinstance(width, WidthRequest) else parse(width)
            for pos, layer in enumerate(moe):
                for e, ex in enumerate(model.blocks[layer].ffn.experts):
                    out[f"blocks.{layer}.ffn.experts.{e}"] = request.width_for(ex.width, pos,
                                                                               len(moe))
    if shared_width is not None:
        request = (shared_width if isinstance(shared_width, WidthRequest)
                   else parse(shared_width, "--shared-width"))
        mlps = [(p, m) for p, m in neurons.mlp_paths(model, shared=True).items()
                if ".experts." not in p]
        if not mlps:
            raise UserError("--shared-width: the model has no shared experts or dense MLPs")
        for pos, (prefix, mlp) in enumerate(mlps):
            out[prefix] = request.width_for(mlp.width, pos, len(mlps))
    return out


class SlimExperts(Pass):
    name = "slim_experts"
    requires = "MLPs at least as wide as the widths asked"
    ensures = "each slimmed MLP keeps exactly its width; others untouched"

    def __init__(self, width=None, method: str = "wanda", refit: str = "lsq",
                 shared_width=None, general_mix: bool = False, memo: dict | None = None):
        """`memo`: a dict shared by instances that slim the same model on the same data to
        different widths (--allow-prune's variants): the neuron statistics and the original's
        fitness do not depend on the width, so the first instance's pass serves the others
        (statistics up to SHARED_STATS bytes; the F x F sums of a large refit are not kept
        between variants)."""
        if method not in METHODS:
            raise UserError(f"unknown width method '{method}'; choose from {', '.join(METHODS)}")
        if refit not in REFITS:
            raise UserError(f"unknown refit '{refit}'; choose from {', '.join(REFITS)}")
        self.width, self.method, self.refit, self.shared_width = width, method, refit, shared_width
        self.general_mix = general_mix
        self.memo = memo

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        wanted = requested_widths(model, self.width, self.shared_width)
        mlps = neurons.mlp_paths(model, shared=True)
        todo = {p: w for p, w in wanted.items() if w < mlps[p].width}
        report: dict = {"pass": self.name, "method": self.method, "refit": self.refit,
                        "width": _text(self.width), "seed": ctx.seed}
        if self.shared_width is not None:
            report["shared_width"] = _text(self.shared_width)
        if not todo:
            return PassResult(model, False, report)  # every MLP already at most that wide
        t0 = time.monotonic()
        need = neurons.statistics_bytes(model, todo, full=True)
        if self.refit == "lsq" and need > REFIT_STATS:
            raise UserError(f"--width-refit lsq: the refit needs the F x F activation statistics "
                            f"of every slimmed MLP, {format_size(need)} here (more than the "
                            f"{format_size(REFIT_STATS)} this pass holds); use --width-refit "
                            "none (the importances need only each neuron's mean square)")
        # calibration for the activation statistics, the refit, or (when given) the report
        measured = (self.method in ("wanda", "activation") or self.refit != "none"
                    or ctx.has_calibration)
        calib = ctx.calibration(model, "--expert-width") if measured else None
        data = self._statistics_data(model, calib)
        if data is not calib:
            report["statistics"] = data.spec
        # full second moments for the refit, or (when small) to report the slice's error
        full = self.refit == "lsq" or need <= FULL_STATS
        layer_major = streams(model)
        key = (id(model), None if data is None else (data.spec, data.n_tokens), full,
               tuple(sorted(todo)))
        shared = self.memo.get(key) if self.memo is not None else None
        if shared is not None and shared[0] is model:  # the model itself: its id not reused
            stats, original = shared[1:]
        else:
            stats, original = self._statistics(model, ctx, calib, data, todo, full)
            if self.memo is not None and (not full or need <= SHARED_STATS):
                self.memo[key] = (model, stats, original)
        rng = random.Random(f"slim/{ctx.seed}")
        new: dict[str, ir.Expert] = {}
        entries: dict[str, dict] = {}
        for prefix, width in todo.items():
            mlp = mlps[prefix]
            down = mlp.down.value()
            kept = neurons.keep_top(neurons.importance(self.method, down, stats.get(prefix), rng),
                                    width)
            if self.refit == "lsq":
                use = neurons.refit(down, stats.get(prefix), kept)
            else:
                error = neurons.slice_error(down, stats.get(prefix), kept)
                use = neurons.Refit(None, None, error, error, error)
            new_down = (ir.mixed_columns(mlp.down, use.matrix) if use.matrix is not None
                        else ir.columns_of(mlp.down, kept))
            new[prefix] = ir.Expert(gate=ir.rows_of(mlp.gate, kept), up=ir.rows_of(mlp.up, kept),
                                    down=new_down)
            entries[prefix] = {"before": mlp.width, "kept": kept, "ridge": use.ridge,
                               "error_slice": use.error_slice, "error": use.error,
                               "error_held_out": use.error_held_out,
                               "tokens": stats[prefix].tokens if prefix in stats else None}
        slim = replace_mlps(model, new)
        touched = {_layer_key(p) for p in todo}
        report.update(_layers_report({
            p: entries.get(p) or {"before": m.width, "kept": list(range(m.width)), "ridge": None,
                                  "error_slice": 0.0, "error": 0.0, "error_held_out": 0.0,
                                  "tokens": stats[p].tokens if p in stats else None}
            for p, m in mlps.items() if _layer_key(p) in touched}))
        if calib is not None and layer_major:
            _, after = stream(ctx.engine, slim, calib, None,
                              StreamingFitness(calib, original if calib.kind == "text" else None),
                              # the key names the neurons kept and the refit: the slimmed
                              # model's history is the original's until this pass returns
                              what=("fitness", self.name, self.refit,
                                    tuple((p, tuple(e["kept"]))
                                          for p, e in sorted(entries.items()))),
                              progress="slimmed model's fitness" if ctx.progress else None)
            report.update(calib=calib.spec, executor="streaming",
                          fitness_before=round(original.value(), 6),
                          fitness=round(after.value(), 6))
        elif calib is not None:
            report["calib"] = calib.spec
            report["fitness_before"] = round(FitnessEvaluator(model, calib, ctx.device)
                                             .fitness({}), 6)
            report["fitness"] = round(FitnessEvaluator(slim, calib, ctx.device).fitness({}), 6)
        report["seconds"] = round(time.monotonic() - t0, 2)
        return PassResult(slim, True, report)

    def _statistics(self, model: ir.Model, ctx: PassContext, calib: CalibSet | None,
                    data: CalibSet | None, todo: dict[str, int], full: bool):
        """(prefix -> NeuronStats, the original's StreamingFitness on `calib` or None): at
        real size one layer-major pass gathers both (two when `data` is not `calib`: a
        fitness scores one kind of data)."""
        if calib is None:
            return {}, None
        if not streams(model):
            return neurons.collect(model, data, set(todo), ctx.device, full), None
        observer, original = stream(
            ctx.engine, model, data, neurons.NeuronObserver(model, data, set(todo), full),
            StreamingFitness(calib) if data is calib else None,
            what=("neurons", full, tuple(sorted(todo))),
            progress="neuron statistics" if ctx.progress else None)
        if data is not calib:
            _, original = stream(ctx.engine, model, calib, None, StreamingFitness(calib),
                                 what=("fitness",),
                                 progress="original's fitness" if ctx.progress else None)
        return observer.result(), original

    def _statistics_data(self, model: ir.Model, calib: CalibSet | None) -> CalibSet | None:
        """What the importances and the refit are computed on: the calibration set, and with
        `general_mix` as many chunks of the built-in general text mix besides (unless that mix
        is the calibration). Fitted to task prompts alone, width removes what they do not
        exercise: on the bundled model at width 192 of 256, the refit fitted to `--calib all`
        was 0.0012 in KL off on the tasks' test prompts and 0.016 on Python source; fitted to
        both, 0.0010 and 0.0008 (README, "Benchmark: expert slimming")."""
        if calib is None or not self.general_mix or calib.spec == DEFAULT:
            return calib
        return calib.joined(build_calib(model, DEFAULT, calib.per_item or calib.n_examples))

    def summary(self, report: dict) -> str:
        layers = report.get("layers", {})
        if not layers:
            return f"expert width {report['width']}: unchanged (no MLP is wider)"
        before = sorted({v["width_before"] for v in layers.values()})
        after = sorted({k for v in layers.values() for k in v["kept"] if k < v["width_before"]})
        line = (f"slimmed {sum(v['slimmed'] for v in layers.values())} MLPs to "
                f"{_span(after)} of {_span(before)} neurons ({report['method']}, refit "
                f"{report['refit']}"
                + (f"; fitted to {report['statistics']})" if "statistics" in report else ")"))
        slimmed = [(h, e) for v in layers.values()
                   for k, h, e in zip(v["kept"], v["error_held_out"], v["error_slice"])
                   if k < v["width_before"] and h is not None and e is not None]
        if slimmed:
            held = sum(h for h, _ in slimmed) / len(slimmed)
            plain = sum(e for _, e in slimmed) / len(slimmed)
            line += (f": relative reconstruction error {held:.4f} on held-out calibration "
                     f"examples (plain slice {plain:.4f}), mean over MLPs"
                     if report["refit"] == "lsq" else
                     f": relative reconstruction error {plain:.4f}, mean over MLPs")
        if "fitness" in report:
            line += (f"; calibration fitness {report['fitness']:.4f} (before "
                     f"{report['fitness_before']:.4f})")
        return line + f"; {report['seconds']:.0f} s"


def replace_mlps(model: ir.Model, new: dict[str, ir.Expert]) -> ir.Model:
    """The model with the MLPs at these IR prefixes replaced."""
    blocks = list(model.blocks)
    for i, b in enumerate(blocks):
        ffn = b.ffn
        if isinstance(ffn, ir.MoE):
            experts = tuple(new.get(f"blocks.{i}.ffn.experts.{e}", ex)
                            for e, ex in enumerate(ffn.experts))
            shared = ffn.shared
            if shared is not None and f"blocks.{i}.ffn.shared.mlp" in new:
                shared = replace(shared, mlp=new[f"blocks.{i}.ffn.shared.mlp"])
            blocks[i] = replace(b, ffn=replace(ffn, experts=experts, shared=shared))
        elif isinstance(ffn, ir.Dense) and f"blocks.{i}.ffn.mlp" in new:
            blocks[i] = replace(b, ffn=ir.Dense(new[f"blocks.{i}.ffn.mlp"]))
    return replace(model, blocks=tuple(blocks))


def _layers_report(entries: dict[str, dict]) -> dict:
    """Per layer (and "L.shared"): the width before, the kept count of each MLP (one number
    when all equal), a hash of the kept neurons, and per MLP the ridge and the relative
    reconstruction error with and without refit."""
    layers: dict[str, dict] = {}
    for prefix, e in entries.items():
        layer = layers.setdefault(_layer_key(prefix), {
            "width_before": e["before"], "kept": [], "ridge": [], "error_slice": [], "error": [],
            "error_held_out": [], "tokens": [], "_kept": []})
        layer["kept"].append(len(e["kept"]))
        layer["slimmed"] = layer.get("slimmed", 0) + (len(e["kept"]) < e["before"])
        layer["_kept"].append(e["kept"])
        layer["ridge"].append(e["ridge"])
        layer["error_slice"].append(_round(e["error_slice"]))
        layer["error"].append(_round(e["error"]))
        layer["error_held_out"].append(_round(e["error_held_out"]))
        layer["tokens"].append(e["tokens"])
    for layer in layers.values():
        digest = hashlib.blake2b(repr(layer.pop("_kept")).encode(), digest_size=8)
        layer["kept_hash"] = digest.hexdigest()
        if len(set(layer["kept"])) == 1:
            layer["width"] = layer["kept"][0]
    return {"layers": layers}


def _layer_key(prefix: str) -> str:
    """blocks.3.ffn.experts.5 -> "3"; blocks.3.ffn.shared.mlp -> "3.shared"; blocks.3.ffn.mlp
    -> "3.mlp" (the report's keys)."""
    parts = prefix.split(".")
    return parts[1] if ".experts." in prefix else f"{parts[1]}.{parts[3]}"


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"


def _round(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 6)


def _text(width) -> str | None:
    if width is None:
        return None
    if isinstance(width, WidthRequest):
        return width.text
    if isinstance(width, dict):
        return "per " + ("expert" if any(isinstance(k, tuple) for k in width) else "layer")
    return str(width)
