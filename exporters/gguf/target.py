"""The GGUF target: llama.cpp's types, memory, file, numerics and launch line.

Weight types: the unit of choice is a GGUF tensor (llama.cpp stores a layer's experts as one
stacked tensor, so per-expert precision is not possible here); `--quant auto` groups them
further (a layer's attention, each stacked expert projection, a shared expert, the embedding,
the output head). Every type is written by moecompile's own writer, tensor by tensor, k-quants
and i-quants through ggml's own quantizer (ggml.py: the bytes llama.cpp's quantizer writes),
with an importance matrix from `--calib` when given for --quant/--quant-map, and always for
--quant auto and --budget.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from moecompile import ir
from moecompile.analysis import allocate, imatrix, sensitivity
from moecompile.analysis.allocate import Structure
from moecompile.analysis.calibration import held_out
from moecompile.errors import UserError
from moecompile.runtime.llama_worker import run_llama_cpp
from moecompile.runtime.streaming import streams
from moecompile.sizes import format_size, parse_size
from moecompile.verify import compare_with_reference, verification_tokens
from moecompile.widths import block_friendly

from ..quant_map import match_rules, read_rules
from ..target import (BudgetUnreachable, Committed, FileVerdict, Target, TypePlan, TypeRequest,
                      VariantSource, failed_name, resolve_ctx, temp_path, type_table, types_entry)
from . import arch as gguf_arch
from . import check, eta, imatrix_dat, memory, offload, writer
from .reader import FileNumerics, read_tensors
from .rounded import RoundedStore
from .types import DTYPES, Q, block_size, encode, ggml as ggml_type, keeps_f32, parse_type
from .types import roundtrip, stored_type, tensor_bytes

log = logging.getLogger("moecompile")

CANDIDATES = ("q8_0", "q6_k", "q5_k", "q4_k", "iq4_xs", "q3_k", "q2_k")  # --quant auto's
LOCAL_PROBE = "q4_k"  # the type every group takes at once to fit layer-local errors to KL


def auto_candidates(model: ir.Model) -> list[str]:
    """The types --quant auto weighs for a group: the checkpoint's lossless 16-bit type, then
    CANDIDATES. Without it a budget between the all-Q8_0 file and the lossless one bought an
    all-Q8_0 file and left the rest of the budget unused (bundled model: 5.84 MiB of weights
    under a budget for 8.7)."""
    return [lossless_dtype(model), *CANDIDATES]


def group_of(name: str) -> str:
    """The unit --quant auto chooses a type for: a layer's attention, each stacked expert
    tensor, a layer's shared expert, the embedding, the output head."""
    m = re.match(r"blk\.(\d+)\.(\w+?)\.weight$", name)
    if not m:
        return name.removesuffix(".weight")
    layer, kind = m.groups()
    if kind.startswith("attn_"):
        return f"blk.{layer}.attn"
    if kind.endswith("_shexp"):
        return f"blk.{layer}.shexp"
    return f"blk.{layer}.{kind}"


def group_units(groups: dict[str, list[writer.PlannedTensor]]) -> dict[str, list[str]]:
    """The IR paths of each group: the units `--quant auto` measures and types."""
    return {g: [p for t in ts for p in t.paths] for g, ts in groups.items()}


class GGUFTarget(Target):
    name = "gguf"
    suffix = ".gguf"
    holds_router_map = False  # llama.cpp's MoE graphs route with a plain linear router

    # ------------------------------------------------------------------ refusals
    def configure(self, options) -> None:
        """Refuse flags llama.cpp cannot honour before any model is read."""
        if options.onnx_moe != "auto":
            raise UserError("--onnx-moe applies to --target onnx")
        if options.drop_moe_layers:
            raise UserError("--drop-moe-layers: llama.cpp's MoE graphs have no form for a block "
                            "without an FFN, so GGUF cannot hold the result; use --drop-blocks, "
                            "or a target that can express it (ONNX)")
        if options.quant not in (None, "auto"):
            parse_type(options.quant)
        for request, what in ((options.expert_widths, "expert"),
                              (options.shared_widths, "shared")):
            if request is not None and not request.uniform:
                raise UserError(f"{request.flag} {request.text}: "
                                + gguf_arch.width_refusal(list(request.values), what))

    def check(self, model: ir.Model) -> str:
        """llama.cpp's arch for the model, or UserError saying why it cannot be exact."""
        return gguf_arch.check_exportable(model)

    # ------------------------------------------------------------------ types
    def planned(self, model: ir.Model) -> list[writer.PlannedTensor]:
        """Every GGUF tensor with the IR paths it holds (F32 as a placeholder type)."""
        return writer.plan(model, self.check(model), f32=True)

    def quantizable(self, model: ir.Model) -> list[writer.PlannedTensor]:
        return [t for t in self.planned(model) if not keeps_f32(t.name, t.shape)]

    def groups(self, model: ir.Model) -> dict[str, list[writer.PlannedTensor]]:
        out: dict[str, list[writer.PlannedTensor]] = {}
        for t in self.quantizable(model):
            out.setdefault(group_of(t.name), []).append(t)
        return out

    @staticmethod
    def group_bytes(group: list[writer.PlannedTensor], type_name: str) -> int:
        return sum(tensor_bytes(stored_type(t.name, t.shape, type_name), t.shape) for t in group)

    def typed(self, model: ir.Model, by_tensor: dict[str, str]) -> ir.Model:
        """The model with each IR path typed as its GGUF tensor (`by_tensor`: GGUF name ->
        asked type; unnamed tensors F32), llama.cpp's fallback applied."""
        types = {}
        for t in self.planned(model):
            kind = stored_type(t.name, t.shape, by_tensor.get(t.name, "f32"))
            types.update((p, kind) for p in t.paths)
        return model.with_types(types)

    def weight_bytes(self, model: ir.Model) -> int:
        """Tensor data bytes of the GGUF written for the model's types."""
        return sum(t.nbytes for t in writer.plan(model, self.check(model)))

    def choose_types(self, model: ir.Model, request: TypeRequest, ctx,
                     variants: VariantSource | None = None) -> TypePlan:
        """The types `request` asks for. `--budget` alone asks for the most faithful file that
        fits: the lossless types if they fit, else types chosen by measured sensitivity — and
        with `variants` (--allow-prune), also a model-wide expert count and width."""
        self.check(model)
        n_ctx = resolve_ctx(model, request.ctx)
        lines: list[str] = []
        if request.fits_budget:
            lossless = self._typed_plan(model, request, n_ctx, ctx, "dtype", None, check=False)
            total = lossless.report["memory"]["total_bytes"]
            if total <= request.budget:
                lossless.lines.insert(0, f"--budget {request.budget_text}: the lossless "
                                         f"{lossless.label} file fits")
                return lossless
            lines.append(f"--budget {request.budget_text}: the lossless {lossless.label} file "
                         f"needs {format_size(total)}; choosing types by measured sensitivity")
        if request.quant == "auto" or request.fits_budget:
            if request.budget is None:
                raise UserError("--quant auto needs --budget SIZE (the memory it fits)")
            # at real size the weights rounded while choosing are kept for the file
            store = _new_store(model) if variants is None else None
            try:
                if variants is None:
                    by_tensor, importance, quant, auto_lines = self._auto(model, request, n_ctx,
                                                                          ctx, store)
                else:
                    model, by_tensor, importance, quant, auto_lines, store = (
                        self._auto_structured(model, request, n_ctx, ctx, variants))
                plan = self._typed_plan(model, request, n_ctx, ctx, "auto", by_tensor,
                                        importance)
            except BaseException:
                if store is not None:
                    store.close()
                raise
            plan.report["quant"] = quant
            plan.lines[:0] = lines + auto_lines
            plan.details["rounded"] = store  # commit copies its bytes and empties it
            return plan
        if request.quant_map:
            rules = read_rules(request.quant_map, parse_type)
            names = [t.name for t in self.quantizable(model)]
            by_tensor = match_rules(request.quant_map, rules, names)
            return self._typed_plan(model, request, n_ctx, ctx, "map", by_tensor)
        if request.quant:
            kind = parse_type(request.quant)
            return self._typed_plan(model, request, n_ctx, ctx, "uniform",
                                    {t.name: kind for t in self.quantizable(model)})
        return self._typed_plan(model, request, n_ctx, ctx, "dtype", None)

    def _typed_plan(self, model: ir.Model, request: TypeRequest, n_ctx: int, ctx, method: str,
                    by_tensor: dict[str, str] | None, importance=None,
                    check: bool = True) -> TypePlan:
        """The plan for GGUF tensor types `by_tensor` (None: --dtype's), checked against the
        budget; for chosen types, an importance matrix when calibration was given."""
        if by_tensor is None:
            dtype = request.dtype if request.dtype != "auto" else lossless_dtype(model)
            if dtype not in DTYPES:
                raise UserError(f"unknown --dtype '{dtype}' (choose from {', '.join(DTYPES)})")
            typed = self.typed(model, {t.name: dtype for t in self.planned(model)})
            label = dtype
        else:
            typed = self.typed(model, by_tensor)
            label = request.quant if method == "uniform" else "mixed"
        weights = self.weight_bytes(typed)
        mem = memory.memory(typed, weights, n_ctx)
        report: dict = {"ctx": n_ctx, "memory": mem.to_dict()}
        lines = []
        fallbacks = self.width_fallbacks(model, by_tensor or {t.name: typed.types[t.paths[0]]
                                                               for t in self.planned(model)})
        if fallbacks:
            report["width_fallbacks"] = fallbacks
            lines += [f"note: {f['tensor']} rows of {f['width']} neurons do not fill "
                      f"{f['asked']}'s blocks of {f['block']}: stored as {f['stored']} "
                      "(llama.cpp's fallback; widths in multiples of 256 keep k-quants, of 32 "
                      "the other types)" for f in fallbacks]
        if request.budget is not None:
            report["budget_bytes"] = request.budget
            lines.append(f"memory: {mem.describe(n_ctx)} = {format_size(mem.total_bytes)} of "
                         f"--budget {format_size(request.budget)}")
            if mem.total_bytes > request.budget and method != "auto" and check:
                raise UserError(f"--budget {request.budget_text}: this configuration needs "
                                f"{format_size(mem.total_bytes)} ({mem.describe(n_ctx)}); "
                                "leave out the type flags to let --budget choose")
        if by_tensor is not None and importance is None and ctx.has_calibration:
            importance = self.importance(model, ctx)
        if importance is not None:
            report["importance_coverage"] = importance[2]
            rare = importance[2]["rare_experts"]
            if rare:
                how = ("topped up with the tokens of their highest router logits"
                       if importance[2]["topped_up"] else
                       f"{sum(n == 0 for n in rare.values())} by none (uniform importance)")
                lines.append(f"importance matrix: {len(rare)} expert(s) reached by fewer than "
                             f"{importance[2]['min_tokens']} calibration tokens, {how}")
        typed = typed.with_history(types_entry(self.name, method, label, typed))
        return TypePlan(typed, label, weights, report, lines,
                        {"dtype": label if by_tensor is None else "mixed",
                         "importance": importance})

    def width_fallbacks(self, model: ir.Model, asked: dict[str, str]) -> list[dict]:
        """Down projections of a slimmed model whose width (their row length) makes llama.cpp
        store a larger type than asked, once per kind of tensor (ffn_down_exps, …)."""
        if not any(entry.get("pass") == "slim_experts" for entry in model.history):
            return []
        seen, out = set(), []
        for t in self.planned(model):
            if "ffn_down" not in t.name or t.name not in asked:
                continue
            kind = t.name.split(".", 2)[-1].removesuffix(".weight")
            stored = stored_type(t.name, t.shape, asked[t.name])
            if stored != asked[t.name] and (kind, t.shape[-1]) not in seen:
                seen.add((kind, t.shape[-1]))
                out.append({"tensor": kind, "width": t.shape[-1], "asked": asked[t.name],
                            "block": block_size(asked[t.name]), "stored": stored})
        return out

    def importance(self, model: ir.Model, ctx) -> tuple[dict, int]:
        """The importance matrix by GGUF tensor and the calibration sequences it came from."""
        calib = ctx.calibration(model, "the importance matrix")
        quantizable = self.quantizable(model)
        paths = {p for t in quantizable for p in t.paths}
        found = imatrix.collect(model, calib, paths, ctx.device, ctx.progress, ctx.engine)
        return imatrix_dat.by_tensor(quantizable, found), found.sequences, found.coverage(paths)

    def _auto(self, model: ir.Model, request: TypeRequest, n_ctx: int, ctx, store=None):
        """--quant auto: measured sensitivity, then the lowest predicted loss that fits. A
        budget no types reach is refused before anything is measured."""
        fixed = memory.context_bytes(model, n_ctx)
        groups = self.groups(model)
        unquantized = sum(t.nbytes for t in self.planned(model) if keeps_f32(t.name, t.shape))
        smallest = {g: min(self.group_bytes(ts, n) for n in CANDIDATES) for g, ts in groups.items()}
        lowest = unquantized + sum(smallest.values())
        if lowest + fixed > request.budget:
            experts = self._experts_that_fit(model, smallest, unquantized, request.budget - fixed)
            hint = ("; even one expert per layer would not fit" if experts is None else
                    f"; pruning to --experts {experts} would fit (or add --allow-prune)")
            raise BudgetUnreachable(
                f"--budget {request.budget_text} is below the smallest reachable size "
                f"{format_size(lowest + fixed)} (weights at the smallest types "
                f"{format_size(lowest)} + KV cache, buffers and runtime for --ctx "
                f"{n_ctx} {format_size(fixed)}){hint}", experts)
        calib = ctx.calibration(model, "--quant auto")
        started = time.monotonic()
        importance = self.importance(model, ctx)
        units = group_units(groups)
        size = lambda g, name: self.group_bytes(groups[g], name)  # noqa: E731
        expected = announce = None
        local_asked = self._is_local(model, request)
        held = held_out(model, calib) if local_asked else None
        if streams(model) and local_asked:
            timing = (time.monotonic() - started, calib.n_tokens,
                      0 if held is None else held.n_tokens)
            expected, rates = self._expected_seconds(model, groups, units, importance[0],
                                                     unquantized, request.budget - fixed,
                                                     *timing, ctx.progress)
            announce = self._mixes_announcer(groups, units, rates, store, timing, expected,
                                             ctx.progress)
        sens, local, info, measure = self._type_sensitivity(model, calib, units, importance,
                                                            request, ctx, store, held)
        group_types, total, predicted, extra, tail = allocate.choose_reported(
            sens, size, unquantized, request.budget - fixed,
            (lambda g: g.endswith("_exps"), measure, info) if local else None, announce)
        by_tensor = {t.name: group_types[g] for g, ts in groups.items() for t in ts}
        quant = {"method": "auto", "calib": calib.spec, "predicted_kl": predicted,
                 "groups": group_types, "sensitivity": sens, **extra}
        if expected is not None:
            quant["expected_seconds"] = expected
            quant["seconds_to_choose"] = round(time.monotonic() - started, 1)
        line = (f"quant auto: {len(group_types)} groups, weights {format_size(total)}, "
                f"predicted KL {predicted:.4f}{tail}")
        short, not_kept = _shortfall(store)
        if not_kept:
            quant["rounded_not_kept"] = not_kept
        return (by_tensor, importance, quant,
                [line, *([short] if short else [])] + type_table(group_types, _group_kind))

    def _auto_structured(self, model: ir.Model, request: TypeRequest, n_ctx: int, ctx,
                         variants: VariantSource):
        """--allow-prune: types, expert count and expert width (one each for the model, as
        llama.cpp holds them) by measured loss per byte. Type sensitivities are measured once
        on the model; each structure's own loss is measured on the variant the job builds, only
        for structures that fit and could beat the best found (allocate.choose_structured).
        Sizes of a structure are predicted from shapes, so nothing is built to be refused.
        Returns (the chosen model, types by tensor, its importance, the report's entry, the
        lines to print, the store holding its rounded weights for the file, or None)."""
        fixed = memory.context_bytes(model, n_ctx)
        groups = self.groups(model)
        planned = self.planned(model)
        full = _full_structure(model)
        structures = self.structures(model, full, request.budget - fixed)

        def size_of(st: Structure):
            return lambda g, name: sum(tensor_bytes(stored_type(t.name, shape, name), shape)
                                       for t in groups[g]
                                       for shape in [_restructured(t.name, t.shape, st)])

        def fixed_of(st: Structure) -> int:
            return sum(tensor_bytes("f32", _restructured(t.name, t.shape, st)) for t in planned
                       if keeps_f32(t.name, t.shape))

        lowest = {st: fixed_of(st) + sum(min(size_of(st)(g, n) for n in CANDIDATES)
                                         for g in groups) for st in structures}
        smallest = min(structures, key=lambda st: lowest[st])
        if lowest[smallest] + fixed > request.budget:
            raise BudgetUnreachable(
                f"--budget {request.budget_text} is below the smallest reachable size "
                f"{format_size(lowest[smallest] + fixed)} even with "
                f"{smallest.describe(full)} (weights at the smallest types "
                f"{format_size(lowest[smallest])} + KV cache, buffers and runtime for --ctx "
                f"{n_ctx} {format_size(fixed)})", None)
        calib = ctx.calibration(model, "--quant auto")
        importance = self.importance(model, ctx)
        units = group_units(groups)
        asked = auto_candidates(model)
        fallbacks = _fallback_types(groups, structures, full, asked)
        candidates = {g: asked + fallbacks.get(g, []) for g in units}
        built: dict[Structure, object] = {}

        def loss_of(st: Structure) -> float:
            built[st] = variants(st.experts, st.width)
            return built[st].loss

        stores = {full: _new_store(model)}  # structure -> its rounded weights (real size)
        try:
            store = stores[full]
            held = held_out(model, calib) if self._is_local(model, request) else None
            sens, local, info, _ = self._type_sensitivity(model, calib, units, importance,
                                                          request, ctx, store, held, candidates)
            choice = allocate.choose_structured(structures, full, sens, size_of, fixed_of,
                                                request.budget - fixed, loss_of,
                                                _priced_at(sens, groups, full, asked))
            importances = {full: importance}

            def with_types(st: Structure, types: dict[str, str]) -> float:
                """The original's rounded weights are in the sensitivity's store already; a
                variant (other values under the same paths) gets a store and an importance
                matrix of its own, both kept for the writer should it win."""
                m = model if st == full else built[st].model
                if st not in importances:
                    importances[st] = self.importance(m, ctx)
                if st not in stores:
                    stores[st] = _new_store(m)
                return self._with_types(m, types, importances[st][0], stores[st],
                                        variants.judge)

            choice = allocate.settle_end_to_end(choice, with_types)
            short, not_kept = _shortfall(store)
        except BaseException:
            _close(stores.values())
            raise
        kept = stores.pop(choice.structure, None)  # the winner's bytes: the file copies them
        _close(stores.values())
        if choice.structure != full:
            model = built[choice.structure].model
            importance = importances.get(choice.structure) or self.importance(model, ctx)
        chosen = self.groups(model)
        by_tensor = {t.name: choice.group_types[g] for g, ts in chosen.items() for t in ts}
        type_loss = choice.predicted - choice.structure_loss
        lines = [f"--allow-prune: {choice.structure.describe(full)} (measured KL "
                 f"{choice.structure_loss:.4f}) + types (predicted KL {type_loss:.4f})"
                 + (f", measured {choice.measured:.4f} together end to end"
                    if choice.measured is not None else "")
                 + f"; {sum(1 for o in choice.options if o.get('measured'))} of "
                 f"{len(structures)} structures measured"]
        for o in choice.options:
            what = Structure(o["experts"], o["width"]).describe(full)
            if not o["fits"]:
                lines.append(f"  {what}: does not fit")
            elif o.get("measured"):
                lines.append(f"  {what}: KL {o['structure_loss']:.4f} + types "
                             f"{o['type_loss']:.4f} = {o['predicted']:.4f}"
                             + (f"; with its types, measured {o['with_types']:.4f}"
                                if "with_types" in o else ""))
            else:
                lines.append(f"  {what}: at least {o['bound']:.4f}, not measured")
        lines += [f"quant auto: {len(choice.group_types)} groups, weights "
                  f"{format_size(choice.total)}, predicted KL {choice.predicted:.4f}"
                  + (f" (layer-local sensitivity on {info['tokens']} tokens)" if local else "")]
        lines += [short] if short else []
        lines += type_table(choice.group_types, _group_kind)
        quant = {"method": "auto", "calib": calib.spec, "predicted_kl": choice.predicted,
                 "groups": choice.group_types, "sensitivity": sens,
                 **({"sensitivity_method": info} if local else {}),
                 "structure": {"experts": choice.structure.experts,
                               "width": choice.structure.width,
                               "experts_before": full.experts, "width_before": full.width,
                               "measured_kl": choice.structure_loss,
                               **({"measured_with_types": choice.measured}
                                  if choice.measured is not None else {}),
                               "options": choice.options}}
        if not_kept:
            quant["rounded_not_kept"] = not_kept
        return model, by_tensor, importance, quant, lines, kept

    def _with_types(self, model: ir.Model, types: dict[str, str], importance: dict, store,
                    judge: Callable) -> float:
        """A structure's model (the original or a variant) with `types` (group -> type), end
        to end: its weights rounded as its file would hold them, with its own importance
        matrix (by GGUF tensor), from `store` where the model streams, judged by `judge`
        (VariantSource.judge: as structures are)."""
        paths = {p: types[g] for g, ts in self.groups(model).items() for t in ts
                 for p in t.paths}
        with self._rounding(model, importance, store)(None, paths) as value:
            return judge(model, sensitivity.Replaced(set(paths), value))

    def structures(self, model: ir.Model, full: Structure, weight_budget: int) -> list[Structure]:
        """The structures --allow-prune weighs: 3/4 and 1/2 of the experts, 7/8, 3/4 and 1/2
        of their width (rounded to whole quantization blocks), and the most experts that fit
        at the smallest types where even half do not. (7/8: on the bundled model at the
        uniform Q4_K file's size, width 224 and types measured KL 0.0030 on test prompts
        against 0.0090 for types alone, where 3/4 tied with types.)"""
        counts = {full.experts, max(1, round(0.75 * full.experts)), max(1, full.experts // 2)}
        groups = self.groups(model)
        smallest = {g: min(self.group_bytes(ts, n) for n in CANDIDATES) for g, ts in groups.items()}
        unquantized = sum(t.nbytes for t in self.planned(model) if keeps_f32(t.name, t.shape))
        fit = self._experts_that_fit(model, smallest, unquantized, weight_budget)
        if fit is not None and fit < min(counts):
            counts.add(fit)
        widths = {full.width, block_friendly(0.875, full.width), block_friendly(0.75, full.width),
                  block_friendly(0.5, full.width)}
        return [Structure(n, w) for n in sorted(counts, reverse=True)
                for w in sorted(widths, reverse=True)]

    @staticmethod
    def _is_local(model: ir.Model, request: TypeRequest) -> bool:
        """The layer-local sensitivity: when asked, or (auto) when the model streams."""
        return request.sensitivity == "local" or (request.sensitivity == "auto"
                                                  and streams(model))

    def _expected_seconds(self, model: ir.Model, groups: dict, units: dict[str, list[str]],
                          importance: dict, unquantized: int, weight_budget: int,
                          pass_seconds: float, calib_tokens: int, held_tokens: int,
                          progress: bool) -> tuple[dict, dict[str, float]]:
        """The time of each stage still to come (eta.py), printed before the sensitivity
        starts: rates measured on one expert (else the first unit), the importance pass timed.
        Returns (the stages' seconds for the report, the rates: seconds per value by type)."""
        parts = [(t, i) for ts in groups.values() for t in ts for i in range(len(t.parts))]
        t, i = next(((t, i) for t, i in parts if writer.is_stacked(t.name)), parts[0])
        n = t.parts[i].shape[-1]
        sample = t.parts[i].value().reshape(-1, n)
        rates = eta.quantize_rates(sample, importance[t.name][i * n:(i + 1) * n],
                                   sorted(set(CANDIDATES) | {LOCAL_PROBE}))
        fits = [name for name in CANDIDATES
                if unquantized + sum(self.group_bytes(ts, name) for ts in groups.values())
                <= weight_budget]
        numel = _numel(groups)
        stages = eta.estimate(units, numel, rates, fits[0] if fits else CANDIDATES[-1],
                              pass_seconds, calib_tokens, held_tokens,
                              recomputed=sensitivity.recomputed_values(model, units, numel),
                              passed=eta.pass_values(model), types=len(auto_candidates(model)))
        total = sum(stages.values())
        if progress:
            tqdm.write(f"--quant auto at this size: about {_minutes(total)} from here ("
                       + ", ".join(f"{k} {_minutes(v)}" for k, v in stages.items())
                       + f"; measured: the importance pass {pass_seconds:.0f} s, "
                       f"{LOCAL_PROBE} at {1e-6 / rates[LOCAL_PROBE]:.0f} M values/s)",
                       file=sys.stderr)
        return {k: round(v, 1) for k, v in {**stages, "total": total}.items()}, rates

    @staticmethod
    def _mixes_announcer(groups: dict, units: dict[str, list[str]], rates: dict[str, float],
                         store, timing: tuple[float, int, int], expected: dict, progress: bool):
        """`announce(mixes)` for choose_measured: once the mixes are chosen, the time their
        measurement takes (eta.mixes_known) is printed and recorded in `expected` — the
        estimate printed at the start could only guess which types they hold."""
        numel = _numel(groups)
        planned = {p: t for ts in groups.values() for t in ts for p in t.paths}

        def kept(path: str, name: str) -> bool:
            t = planned[path]
            return store is not None and store.holds(
                path, int(ggml_type(stored_type(t.name, t.shape, name))))

        def announce(mixes: list[dict[str, str]]) -> None:
            seconds, values = eta.mixes_known(mixes, units, numel, rates, kept, *timing)
            expected["mixes, once known"] = round(seconds, 1)
            if progress:
                tqdm.write(f"--quant auto: {len(mixes)} mix(es) to measure end to end: about "
                           f"{_minutes(seconds)} from here ({values / 1e9:.2f} G values to "
                           f"round, a pass each)", file=sys.stderr)

        return announce

    def _type_sensitivity(self, model: ir.Model, calib, units: dict[str, list[str]],
                          importance, request: TypeRequest, ctx, store=None, held=None,
                          candidates=None):
        """(unit -> type -> predicted KL, whether it is layer-local, how it was measured,
        measure(mix): a mix's KL end to end — None for the full sensitivity, which measures
        each unit end to end already). Layer-local when asked, or (auto) when the model
        streams; its mixes are measured on the held-out calibration `held` too. `candidates`:
        the types measured (default auto_candidates), for every unit or per unit."""
        rounding = self._rounding(model, importance[0], store)
        local = self._is_local(model, request)
        candidates = candidates or auto_candidates(model)
        if not local:
            sens = sensitivity.measure(model, calib, units, candidates, rounding,
                                       ctx.device, ctx.progress, ctx.engine)
            return sens, False, {"method": "full"}, None
        sens, info, check = sensitivity.local_losses(
            model, calib, units, candidates, rounding, LOCAL_PROBE, ctx.device,
            ctx.progress, ctx.engine, held)

        def measure(mix: dict[str, str]) -> float:
            chosen = {p: mix[g] for g, paths in units.items() for p in paths}
            with rounding(None, chosen) as value:
                return check(set(chosen), value)

        return sens, True, info, measure

    def _rounding(self, model: ir.Model, importance: dict | None, store=None):
        """`rounding(name)`: a context giving value(path, tensor), the weight as a file of type
        `name` holds it (ggml's rounding with its importance slice), for the quantizable
        tensors; `rounding(None, types)` rounds each path to its own type. Quantization is
        row-wise, so llama's q/k row order does not matter. With a `store` (rounded.py) each
        (path, type) is quantized once and its bytes kept for the next use."""
        where = {p: (t, i) for t in self.quantizable(model) for i, p in enumerate(t.paths)}

        @contextmanager
        def rounding(name: str | None, types: dict[str, str] | None = None):
            def value(path: str, tensor: ir.Tensor) -> torch.Tensor | None:
                t, index = where[path]
                kind = name if types is None else types[path]
                qtype = ggml_type(stored_type(t.name, t.shape, kind))
                n = tensor.shape[-1]
                imatrix = None if importance is None else importance[t.name][index * n:
                                                                              (index + 1) * n]
                # a 16-bit type is a cast: nothing worth keeping on disk (the lossless candidate
                # would add 2 bytes a value to the store, beside the 4.4 of the seven others)
                if store is None or qtype in (Q.F32, Q.F16, Q.BF16):
                    return torch.from_numpy(roundtrip(tensor.value().to(torch.float32).numpy(),
                                                      qtype, imatrix))
                return torch.from_numpy(store.values(
                    path, int(qtype), tensor.shape,
                    lambda: encode(tensor.value().reshape(-1, n), qtype, imatrix)))
            yield value

        return rounding

    def _experts_that_fit(self, model, smallest: dict[str, int], unquantized: int,
                          weight_budget: int) -> int | None:
        """The most experts per layer with which the smallest types (`smallest`: group ->
        bytes) fit: expert tensors shrink in proportion, everything else stays."""
        experts = sum(v for g, v in smallest.items() if g.endswith("_exps"))
        rest = sum(v for g, v in smallest.items() if not g.endswith("_exps")) + unquantized
        n_experts = max(b.ffn.n_experts for b in model.blocks if hasattr(b.ffn, "n_experts"))
        fits = int((weight_budget - rest) / (experts / n_experts)) if experts else 0
        return min(fits, n_experts - 1) if fits >= 1 else None

    # ------------------------------------------------------------------ commit
    def commit(self, plan: TypePlan, out: Path, verify: bool = True, device: str | None = None,
               progress: bool = True) -> Committed:
        """Export under a temporary name (each tensor quantized as it is written, with its
        importance vector when there is one), verify, rename to OUT or OUT.FAILED.gguf; the
        importance matrix goes beside it as OUT.imatrix.dat. Any error or Ctrl-C removes what
        was written."""
        model = plan.model
        arch = self.check(model)
        importance = plan.details.get("importance")
        rounded = plan.details.get("rounded")
        tmp = temp_path(out)
        dat = out.with_suffix(".imatrix.dat")
        dat_tmp = temp_path(dat)
        try:
            try:
                writer.export(model, tmp, arch, importance[0] if importance else None,
                              progress=progress, rounded=rounded)
                if rounded is not None:
                    rounded.close()
                if importance:
                    imatrix_dat.write_dat(dat_tmp, *importance[:2])
            except OSError as exc:
                raise UserError(f"{out}: cannot write ({exc.strerror or exc})") from None
            written = read_tensors(tmp)
            verification = None
            if verify:
                log.info("verifying %s in llama.cpp against the reference executor", out.name)
                findings, verification = self._verify(tmp, model, arch, device)
                verification = verification.with_findings(findings)
            final = out if verification is None or verification.passed else failed_name(out)
            files = [final]
            if importance:
                os.replace(dat_tmp, dat)
                files.append(dat)
            os.replace(tmp, final)
        finally:
            for leftover in (tmp, dat_tmp):
                leftover.unlink(missing_ok=True)
            if rounded is not None:
                rounded.close()
        fields = {
            "arch": arch,
            "dtype": plan.details.get("dtype", "mixed"),
            "output": str(final),
            "passes": list(model.history),
            "tensor_bytes": sum(b for *_, b in written),
            "file_bytes": final.stat().st_size,
            "tensors": [{"name": name, "type": qtype.name, "shape": list(shape), "bytes": nbytes}
                        for name, shape, qtype, nbytes in written],
        }
        if importance:
            fields["imatrix_file"] = str(dat)
        return Committed(final, files, fields, verification)

    def committed_lines(self, committed: Committed, plan: TypePlan) -> list[str]:
        importance = plan.details.get("importance")
        if not importance:
            return []
        return [f"importance matrix from {importance[1]} calibration sequences: "
                f"{committed.report['imatrix_file']}"]

    # ------------------------------------------------------------------ any file
    def verify_file(self, path: Path, model: ir.Model, device: str | None = None) -> FileVerdict:
        """A GGUF from anywhere against the checkpoint: that llama.cpp can compute the
        checkpoint at all (its arch's fixed semantics), the file's metadata, each tensor's values
        within its type's rounding, and the file run in llama.cpp against the reference on the
        file's own numbers."""
        findings = []
        try:
            arch = self.check(model)
        except UserError as exc:
            findings.append(f"llama.cpp cannot compute this checkpoint faithfully: {exc}")
            arch = gguf_arch.ARCHS[model.family].name
        file_arch, fields = check.read_metadata(path)
        if file_arch != arch:
            return FileVerdict(path, findings + [f"the file's arch is {file_arch!r}, the "
                                                 f"checkpoint's is {arch!r}"], None)
        more, verification = self._verify(path, model, arch, device, fields)
        return FileVerdict(path, findings + more, verification)

    def _verify(self, path: Path, model: ir.Model, arch: str, device: str | None,
                fields: dict | None = None):
        """(what differs from the checkpoint in the file's metadata and values, the file run
        in llama.cpp against the reference on its own numbers)."""
        fields = check.read_metadata(path)[1] if fields is None else fields
        planned = writer.plan(model, arch, f32=True)
        findings = check.metadata_mismatches(fields, arch, model)
        findings += check.tensor_mismatches(path, planned)
        tokens = verification_tokens(model)
        got = run_llama_cpp(path, tokens.tolist())
        return findings, compare_with_reference("llama.cpp", got, model, tokens,
                                                FileNumerics(path, planned), device)

    # ------------------------------------------------------------------ running it
    def launch_plan(self, plan: TypePlan, file_name: str, options) -> tuple[list[str], dict]:
        """--gpu-mem: the placement plan for the file as a llama-server command line (the
        planned tensor bytes are the file's, exactly)."""
        if not options.gpu_mem:
            return ([f"  llama-server -m {file_name} -c {plan.report['ctx']}"]
                    if options.plan else []), {}
        tensors = [(t.name, t.nbytes) for t in writer.plan(plan.model, self.check(plan.model))]
        ram = parse_size(options.ram, "--ram") if options.ram else 1 << 62
        p = offload.plan(plan.model, tensors, file_name, plan.report["ctx"],
                         parse_size(options.gpu_mem, "--gpu-mem"), ram)
        lines = [f"offload plan: GPU {format_size(p.gpu_bytes)} ({len(p.gpu)} tensors + KV "
                 f"cache + compute), RAM {format_size(p.ram_bytes)} ({len(p.cpu)} tensors + "
                 "host buffers)",
                 f"  {p.command}",
                 f"  llama-cpp-python: Llama(model_path=..., n_gpu_layers="
                 f"{p.python_args['n_gpu_layers']}, n_ctx={p.python_args['n_ctx']}): "
                 f"{p.python_note}"]
        return lines, {"offload": p.to_dict()}


def _numel(groups: dict) -> dict[str, int]:
    """Values per IR path of the groups' tensors."""
    return {p: part.numel for ts in groups.values() for t in ts
            for p, part in zip(t.paths, t.parts)}


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _shortfall(store) -> tuple[str | None, int | None]:
    """(the line telling the user that the rounded store's disk ran short, the weights it could
    not keep), or (None, None) without a store or when it kept every weight."""
    short = store.shortfall() if store is not None else None
    return short, store.not_kept if short else None


def _new_store(model: ir.Model) -> RoundedStore | None:
    """A store of rounded weights for a model that streams (real size: where the same weights
    are quantized again for every mix measured end to end, and once more for the file), else
    None."""
    return RoundedStore() if streams(model) else None


def _close(stores) -> None:
    """Empty every store of `stores` (None: none was made)."""
    for store in stores:
        if store is not None:
            store.close()


def _full_structure(model: ir.Model) -> Structure:
    """The model's own expert count and width (one each: what a GGUF holds)."""
    moes = [b.ffn for b in model.blocks if isinstance(b.ffn, ir.MoE)]
    return Structure(moes[0].n_experts, moes[0].experts[0].width)


def _restructured(name: str, shape: tuple[int, ...], st: Structure) -> tuple[int, ...]:
    """A GGUF tensor's shape with `st`'s experts per layer and width: stacked experts
    (E, F, hidden) / down (E, hidden, F), and the router (E, hidden)."""
    if name.endswith("_exps.weight"):
        e, a, b = shape
        return (st.experts, a, st.width) if "ffn_down" in name else (st.experts, st.width, b)
    if name.endswith("ffn_gate_inp.weight"):
        return (st.experts, shape[1])
    return shape


def _held_as(tensors: list, name: str, st: Structure) -> str:
    """The type a group asked to be `name` is held as at structure `st` (its tensors'
    stored type: the fallback where `st`'s rows do not fill the type's blocks)."""
    return stored_type(tensors[0].name, _restructured(tensors[0].name, tensors[0].shape, st),
                       name)


def _priced_at(sens: dict[str, dict[str, float]], groups: dict[str, list], full: Structure,
               candidates: list[str]) -> Callable[[Structure], dict[str, dict[str, float]]]:
    """sens_at for allocate.choose_structured: each candidate type's loss at a structure is
    that of the type its rows are held as there, found among the measured types by what the
    full model holds for each. (Q4_K asked at width 224 is held as Q5_0; priced at Q4_K's
    loss, a narrower width paid Q5_0's bytes for Q4_K's damage.)"""
    def sens_at(st: Structure) -> dict[str, dict[str, float]]:
        out = {}
        for g, losses in sens.items():
            measured = {_held_as(groups[g], n, full): v for n, v in losses.items()}
            out[g] = {n: measured.get(_held_as(groups[g], n, st), losses[n]) for n in candidates}
        return out

    return sens_at


def _fallback_types(groups: dict[str, list], structures: list[Structure], full: Structure,
                    candidates: list[str]) -> dict[str, list[str]]:
    """Per group, the types some structure's rows fall back to that are not candidates
    already (Q5_0, Q5_1, Q4_0, IQ4_NL for down projections of a width not a multiple of
    256): --allow-prune measures them too, so a narrower width is priced at the damage of
    the type it will hold."""
    out: dict[str, list[str]] = {}
    for g, tensors in groups.items():
        held = {_held_as(tensors, name, st) for st in structures for name in candidates}
        measured = {_held_as(tensors, name, full) for name in candidates}
        extra = sorted(held - measured - {"f32", "f16", "bf16"})
        if extra:
            out[g] = extra
    return out


def _group_kind(group: str) -> str:
    """blk.3.ffn_down_exps -> ffn_down_exps; blk.3.attn -> attn; output -> output."""
    return group.split(".", 2)[-1] if group.startswith("blk.") else group


def lossless_dtype(model: ir.Model) -> str:
    """bf16 for a bf16 checkpoint (lossless), f16 otherwise — as llama.cpp's converter does."""
    return ("bf16" if model.blocks[0].ffn_norm.dtype == "bf16" or model.embed.dtype == "bf16"
            else "f16")


