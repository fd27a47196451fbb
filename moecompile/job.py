"""One compile job, in one straight line:

    load → passes (in their documented order) → the target chooses weight types → the target
    commits (export under a temporary name → verify → rename or .FAILED) → report

The model is exported once; nothing re-plans what was planned. The calibration set is built
once, on first use, and handed to every pass and measurement that needs it. This module is the
only one that prints (`say`); everything else reports through return values, and logs only
progress narrative.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__, frontend, ir
from .analysis.calibration import CalibSet, build_calib, held_out
from .analysis.eep import EEPConfig
from .analysis.sensitivity import CalibKL, StreamingKL, streaming_kl
from .distributed.connect import open_engine
from .errors import UserError
from .exporters import target_for
from .exporters.target import (Committed, TypePlan, TypeRequest, Variant, VariantSource,
                               write_json_atomic)
from .options import Options, output_file
from .passes.base import Pass, PassContext, PassManager
from .passes.drop import DropBlocks, DropMoELayers
from .passes.prune_experts import PruneExperts
from .passes.reduce_top_k import ReduceTopK
from .passes.slim_experts import SlimExperts
from .runtime.executor import default_device
from .runtime.streaming import StreamingExecutor, streams
from .tasks.calibration import DEFAULT

log = logging.getLogger("moecompile")


@dataclass
class JobResult:
    exit_code: int
    plan: TypePlan | None = None
    committed: Committed | None = None
    report: dict | None = None

    @property
    def output(self) -> Path | None:
        return self.committed.output if self.committed else None

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    @property
    def verification(self):
        return self.committed.verification if self.committed else None


def eep_config(options: Options) -> EEPConfig:
    """The search the flags ask for: --search-budget (or the default length), --seed,
    --search-batch."""
    evaluations, seconds = options.search_length
    return EEPConfig(evaluations=evaluations, seconds=seconds, seed=options.seed,
                     batch=options.batch, asked=options.search_budget is not None)


def passes_for(options: Options, router_mode: str) -> list[Pass]:
    """The passes the flags ask for, in their documented order: --experts, --expert-width
    (and --shared-width), --top-k, --drop-blocks, --drop-moe-layers (the Python API composes
    them in any order)."""
    config = eep_config(options)
    out: list[Pass] = []
    if options.experts is not None:
        out.append(PruneExperts(options.experts, options.prune_method, config, router_mode))
    if options.slimmed:
        out.append(SlimExperts(options.expert_widths, options.width_method, options.width_refit,
                               options.shared_widths, options.widths_fit_the_mix))
    if options.top_k is not None:
        out.append(ReduceTopK(options.top_k, options.topk_method, config))
    if options.drop_blocks:
        out.append(DropBlocks(options.drop_blocks))
    if options.drop_moe_layers:
        out.append(DropMoELayers(options.drop_moe_layers))
    return out


def run(options: Options, say: Callable[[str], None] = print) -> JobResult:
    target = target_for(options.target)
    target.configure(options)
    options.validate()
    model = frontend.load(options.model)
    router_mode = "exact" if target.holds_router_map else "onehot"
    # the engine runs the calibration work (here, or on Ray workers); it is closed — a cluster
    # it started shut down — before the file is written, and on any error or Ctrl-C
    with open_engine(options.ray, options.device, say) as engine:
        ctx = PassContext(device=options.device or default_device(), seed=options.seed,
                          progress=not options.quiet, calibrate=_calibrator(options, say),
                          explicit=options.calib is not None, engine=engine)
        model = _run_passes(model, passes_for(options, router_mode), ctx, say)
        request = TypeRequest(dtype=options.dtype, quant=options.quant,
                              quant_map=Path(options.quant_map) if options.quant_map else None,
                              budget=options.budget_bytes, budget_text=options.budget,
                              ctx=options.ctx, sensitivity=options.sensitivity)
        plan = _choose_types(target, model, request, ctx, options, router_mode, say)
        engine_report = engine.report()
    if options.ray:
        say(_engine_line(engine_report))
    for line in plan.lines:
        say(line)
    if options.print_ir:
        say(ir.format_ir(plan.model))
    name = f"{Path(plan.model.source).name}-{plan.label}{target.suffix}"
    if options.plan or not options.output:
        out = output_file(options.output, plan.model.source, plan.label, target.suffix,
                          create=False) if options.output else Path(name)
        launch_lines, _ = target.launch_plan(plan, out.name, options)
        if options.plan:
            say(f"plan: {out} ({plan.label}, {len(plan.model.types)} tensors typed, "
                f"{plan.weight_bytes / 2**20:.1f} MiB of weights); nothing written (--plan)")
            for line in launch_lines:
                say(line)
        return JobResult(0, plan)
    out = output_file(options.output, plan.model.source, plan.label, target.suffix)
    launch_lines, launch_report = target.launch_plan(plan, out.name, options)
    if ctx.calib is not None:
        launch_report = {"calibration": {"spec": ctx.calib.spec, "kind": ctx.calib.kind,
                                         "examples": ctx.calib.n_examples,
                                         "tokens": ctx.calib.n_tokens,
                                         "given": options.calib is not None},
                         "engine": engine_report, **launch_report}
    result = commit(target, plan, out, verify=not options.no_verify, device=options.device,
                    progress=not options.quiet, extra_report=launch_report, say=say)
    for line in launch_lines:
        say(line)
    return result


def verify_file(file: str, model_folder: str, device: str | None = None,
                say: Callable[[str], None] = print):
    """`moecompile verify FILE --against MODEL`: the target of the file's format checks it
    against the checkpoint (exporters/*/target.py `verify_file`)."""
    path = Path(file)
    if path.suffix not in (".gguf", ".onnx") or not path.is_file():
        raise UserError(f"{file}: expected a .gguf or .onnx file")
    model = frontend.load(model_folder)
    verdict = target_for(path.suffix[1:]).verify_file(path, model, device)
    for line in verdict.lines():
        say(line)
    return verdict


def compile_model(model: ir.Model, out: Path, target="gguf",
                  request: TypeRequest | None = None, ctx: PassContext | None = None,
                  verify: bool = True, device: str | None = None,
                  progress: bool = True) -> JobResult:
    """The job's second half for a model already in the IR (the Python API): the target (a
    name or a configured Target) chooses types for `request`, then commits to `out` and
    writes OUT.report.json."""
    chosen = target_for(target) if isinstance(target, str) else target
    plan = chosen.choose_types(model, request or TypeRequest(), ctx or PassContext(
        device=device or default_device(), progress=progress))
    return commit(chosen, plan, Path(out), verify, device, progress)


def commit(target, plan: TypePlan, out: Path, verify: bool = True, device: str | None = None,
           progress: bool = True, extra_report: dict | None = None,
           say: Callable[[str], None] = lambda line: None) -> JobResult:
    """Write, verify and rename the file (the target's commit), then OUT.report.json."""
    committed = target.commit(plan, out, verify=verify, device=device, progress=progress)
    report_path = out.with_suffix(".report.json")
    report = {"moecompile": __version__, "source": plan.model.source,
              "family": plan.model.family, "target": target.name, **committed.report,
              **plan.report, **(extra_report or {}),
              "verification": committed.verification.to_dict() if committed.verification
              else None}
    write_json_atomic(report_path, report)
    for line in target.committed_lines(committed, plan) + _summary(committed, report_path):
        say(line)
    return JobResult(0 if committed.passed else 1, plan, committed, report)


def default_calibration(model_folder: str) -> tuple[str, str]:
    """(--calib spec, where it comes from) when the user gives none: the model folder's own
    default (`moecompile.json`: {"calibration": SPEC}, for a model trained on particular data,
    like the bundled one), else the built-in mix of prose, code and numbers."""
    sidecar = Path(model_folder) / "moecompile.json"
    if sidecar.is_file():
        try:
            spec = json.loads(sidecar.read_text())["calibration"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{sidecar}: expected {{\"calibration\": SPEC}} ({exc})") from None
        if spec.endswith((".txt", ".jsonl")):
            spec = str(Path(model_folder) / spec)
        return spec, f"the default named by {sidecar.name} in the model folder"
    return DEFAULT, "the built-in mix of prose, code and numbers"


def _calibrator(options: Options, say: Callable[[str], None]) -> Callable[[ir.Model], CalibSet]:
    def build(model: ir.Model) -> CalibSet:
        spec, origin = (options.calib, None) if options.calib else default_calibration(options.model)
        calib = build_calib(model, spec, options.calib_n)
        line = (f"calibration: {calib.spec} ({calib.n_examples} examples, {calib.n_tokens} "
                f"tokens; fitness: "
                f"{'exact-match accuracy' if calib.kind == 'tasks' else '-KL to the original'})")
        say(line if origin is None else f"{line} — {origin}; --calib DATA to use your own")
        return calib
    return build


def _run_passes(model: ir.Model, passes: list[Pass], ctx: PassContext,
                say: Callable[[str], None]) -> ir.Model:
    model, done = PassManager(passes).run(model, ctx)
    for p, result in done:
        line = p.summary(result.report)
        if line:
            say(line)
    return model


def _choose_types(target, model: ir.Model, request: TypeRequest, ctx: PassContext,
                  options: Options, router_mode: str, say: Callable[[str], None]) -> TypePlan:
    """The target's type choice; with --allow-prune the target may also take fewer or
    narrower experts, which the job builds with the passes when the target asks."""
    variants = PassVariants(model, ctx, options, router_mode, say) if options.allow_prune else None
    return target.choose_types(model, request, ctx, variants)


class PassVariants(VariantSource):
    """Structural variants for a budget (--allow-prune), built with the passes in their
    documented order (experts, then width) — each pruned model once, each variant once — and
    measured: KL to the original at full precision on held-out calibration data (the next
    --calib-n items of the same spec, where it has them): pruning and the width refit are
    fitted to the calibration set, so they are not judged on the data they were fitted to.
    (Measured on the bundled model at --calib-n 16, width 192 with refit: KL 0.0006 on the
    calibration prompts and 0.0006 on the held-out ones — no optimism to speak of there.)

    A structure's loss is the larger of that and its KL on the built-in general text mix
    (--calib-n held-out chunks of it; the one set when the calibration is that mix): pruning
    and slimming remove what their data does not exercise, which prompts a little outside it
    then miss, while quantization damages every input a little. Judged on held-out
    calibration alone, the budget took width 192 and 128 on the bundled model, whose files
    were closer to the original there than types alone (KL 0.0020 vs 0.0042 at Q4_K's size)
    but 7x further on held-out Python source and 0.28-0.53 points less accurate on the test
    prompts (tools/bench_slim.py). Widths are fitted to the calibration and the mix's first
    --calib-n chunks (--width-data calib+mix, the default), which keeps what text uses: width
    192's KL on held-out chunks of the mix fell from 0.030 to 0.0026.

    A model too large to run token-major is measured layer-major (runtime/streaming.py): one
    pass of the original per data set keeps its top-K log-probabilities, one pass per variant
    and set is scored against them."""

    def __init__(self, model: ir.Model, ctx: PassContext, options: Options, router_mode: str,
                 say: Callable[[str], None]):
        self.model, self.ctx, self.options, self.router_mode = model, ctx, options, router_mode
        self.say = say
        self.pruned: dict[int, ir.Model] = {}
        self.built: dict[tuple[int, int], Variant] = {}
        self.judges: dict | None = None  # data set -> KL of a model to the original on it
        self.statistics: dict = {}  # what every width's slimming pass shares (SlimExperts.memo)

    def __call__(self, experts: int, width: int) -> Variant:
        key = (experts, width)
        if key not in self.built:
            t0 = time.monotonic()
            passes_run: list[str] = []
            model = self._pruned(experts, passes_run)
            if any(ex.width > width for b in model.blocks if isinstance(b.ffn, ir.MoE)
                   for ex in b.ffn.experts):
                slim = SlimExperts(str(width), self.options.width_method,
                                   self.options.width_refit,
                                   general_mix=self.options.widths_fit_the_mix,
                                   memo=self.statistics)
                model, _ = PassManager([slim]).run(model, self.ctx)
                passes_run.append(f"width {width} ({self.options.width_method}, refit "
                                  f"{self.options.width_refit})")
            losses = self._losses(model)
            self.say(f"--allow-prune: measured {', '.join(passes_run)}: KL "
                     + ", ".join(f"{v:.4f} on {name}" for name, v in losses.items())
                     + f" ({time.monotonic() - t0:.0f} s)")
            self.built[key] = Variant(model, max(losses.values()))
        return self.built[key]

    def judge(self, model: ir.Model, numerics) -> float:
        """The larger KL of `model` on `numerics` over the data sets a structure is judged on
        (as its loss at full precision)."""
        return max(self._losses(model, numerics).values())

    def _losses(self, model: ir.Model, numerics=None) -> dict[str, float]:
        """KL(original || model) at full precision (or on `numerics`) on each data set a
        structure is judged on: the held-out calibration data and the built-in general text
        mix."""
        if self.judges is None:
            calib, calib_name = self._held_out()
            if calib.spec == DEFAULT:
                sets = {"the general text mix": calib}
            else:
                # held out too: --width-data calib+mix fits widths to its first chunks
                fitted = build_calib(self.model, DEFAULT, self.options.calib_n)
                text = held_out(self.model, fitted) or fitted
                self.say(f"--allow-prune: structures also measured on the general text mix "
                         f"({text.n_examples} {'held-out ' if text is not fitted else ''}"
                         f"chunks, {text.n_tokens} tokens)")
                sets = {calib_name: calib, "the general text mix": text}
            self.judges = {name: self._judge(data) for name, data in sets.items()}
        return {name: judge(model, numerics) for name, judge in self.judges.items()}

    def _judge(self, data: CalibSet) -> Callable[[ir.Model, object], float]:
        """KL(original || a model on some numerics) on `data`: token-major for a model that
        fits, else one layer-major pass of the original now and one of each model later."""
        device = self.ctx.device
        if not streams(self.model):
            return CalibKL(self.model, data, device).of_model
        reference = StreamingKL()
        StreamingExecutor(self.model, device).run(data.ids, data.mask, reference.consume)
        return lambda model, numerics: streaming_kl(model, data.ids, data.mask, reference,
                                                    numerics, device)

    def _held_out(self) -> tuple[CalibSet, str]:
        """The calibration items after the first --calib-n, and what to call them in the
        progress lines: the fitted ones themselves when the spec has no more."""
        calib = self.ctx.calibration(self.model, "--allow-prune")
        held = held_out(self.model, calib)
        if held is None:
            self.say(f"--allow-prune: calibration '{calib.spec}' has no items beyond the first "
                     f"{calib.per_item}; structures are measured on the data they were fitted "
                     f"to")
            return calib, "calibration (fitted to)"
        self.say(f"--allow-prune: structures measured on {held.n_examples} held-out "
                 f"calibration examples ({held.n_tokens} tokens)")
        return held, "held-out calibration"

    def _pruned(self, experts: int, passes_run: list[str]) -> ir.Model:
        moes = [b.ffn for b in self.model.blocks if isinstance(b.ffn, ir.MoE)]
        if experts >= max(f.n_experts for f in moes):
            return self.model
        if experts not in self.pruned:
            prune = PruneExperts(experts, self.options.prune_method, eep_config(self.options),
                                 self.router_mode)
            self.pruned[experts], _ = PassManager([prune]).run(self.model, self.ctx)
        passes_run.append(f"{experts} experts ({self.options.prune_method})")
        return self.pruned[experts]


def _engine_line(report: dict) -> str:
    line = f"ray: {report['tasks']} shard task(s)"
    if "candidates" in report:
        line += f", {report['candidates']} candidates scored"
    return (line + f" on {report['workers']} workers ({report['resent']} resent after a "
            f"worker died, {report['replaced_workers']} workers replaced)")


def _summary(committed: Committed, report_path: Path) -> list[str]:
    r = committed.report
    lines = [f"wrote {committed.output} ({r['arch']}, {r['tensor_bytes'] / 2**20:.1f} MiB of "
             f"tensors, {len(r['tensors'])} tensors)"]
    if committed.verification is not None:
        lines.append("verify " + committed.verification.summary())
    else:
        lines.append("verification skipped (--no-verify)")
    lines.append(f"report {report_path}")
    return lines
