"""The ONNX target: ONNX Runtime's types, memory, files, numerics and verification.

Weight types here are per IR tensor, so a layer's experts may differ in precision (the portable
MoE lowering holds them one by one; llama.cpp can only type a whole stacked layer tensor):
`--quant int8|int4` quantizes every linear weight; `--quant-map FILE.json` takes
{"IR tensor-path regex": "int4" | "int8" | "f32"} (paths as the report names them, e.g.
`blocks\\.0\\.ffn\\.experts\\.3\\.`), first match wins; `--quant auto --budget SIZE --calib
DATA` chooses per expert by measured sensitivity. The memory here is weights + the float32 KV
cache for `--ctx` tokens: ONNX Runtime's activation arena is not modelled.

`--onnx-moe auto` tries ONNX Runtime's fused MoE kernels first (the fastest form on ORT ≥ 1.32)
and keeps them only when they verify; otherwise the portable per-expert form is written.
"""

from __future__ import annotations

import logging
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from moecompile import ir
from moecompile.analysis import allocate, sensitivity
from moecompile.analysis.calibration import held_out
from moecompile.errors import UserError, VerificationError
from moecompile.runtime.streaming import streams
from moecompile.sizes import format_size
from moecompile.verify import compare_with_reference, verification_tokens

from ..quant_map import match_rules, read_rules
from ..target import (Committed, FileVerdict, Target, TypePlan, TypeRequest, failed_name,
                      resolve_ctx, temp_path, type_table, types_entry)
from . import lower, package, reader
from . import quant as oq
from .numerics import OnnxNumerics

log = logging.getLogger("moecompile")

TYPES = ("int8", "int4")
CANDIDATES = ("f32", "int8", "int4")  # --quant auto's, per unit
CACHED_STEPS = 4  # tokens re-run one at a time through the KV cache during verification


def linear_weights(model: ir.Model) -> list[str]:
    """IR paths of the tensors the ONNX graph multiplies as linear layers and can store as
    blocks: attention, experts, shared experts, dense MLPs and the output head (also when tied:
    the graph holds it apart from the gathered embedding). Routers, the shared-expert gate and
    the embedding stay float32; a weight whose input width does not fill 32-wide blocks too."""
    out = []
    for name, t in model.tensors():
        leaf = name.rsplit(".", 1)[-1]
        if len(t.shape) != 2 or ".router." in name or name.endswith("shared.gate"):
            continue
        if leaf in ("q", "k", "v", "o", "gate", "up", "down", "lm_head") and oq.quantizable(t.shape):
            out.append(name)
    return out


def width_fallbacks(model: ir.Model) -> list[int]:
    """Widths of a slimmed model's down projections that cannot be stored as blocks (their
    rows do not fill them), so they stay float32."""
    if not any(entry.get("pass") == "slim_experts" for entry in model.history):
        return []
    return sorted({t.shape[-1] for name, t in model.tensors()
                   if name.endswith(".down") and not oq.quantizable(t.shape)})


def unit_of(path: str) -> str:
    """blocks.3.attn.q -> blocks.3.attn; blocks.3.ffn.experts.5.down -> blocks.3.ffn.experts.5."""
    m = re.match(r"(blocks\.\d+\.(?:attn|ffn\.experts\.\d+|ffn\.shared|ffn))\.", path)
    return m.group(1) if m else path


def _unit_kind(unit: str) -> str:
    """blocks.3.ffn.experts.5 -> experts; blocks.3.attn -> attn; lm_head -> lm_head."""
    parts = unit.split(".")
    return "experts" if "experts" in parts else parts[-1] if unit.startswith("blocks.") else unit


def _parse_type(name: str) -> str:
    if name not in (*TYPES, "f32"):
        raise UserError(f"--quant-map: type {name!r}: --target onnx takes int8, int4 or f32")
    return name


def kv_cache_bytes(model: ir.Model, context: int) -> int:
    """The float32 keys and values a generation loop holds for `context` tokens."""
    return sum(4 * 2 * context * b.attn.n_kv_heads * b.attn.head_dim for b in model.blocks)


class ONNXTarget(Target):
    name = "onnx"
    suffix = ".onnx"
    holds_router_map = True  # the graph computes EEP's exact router mapping

    def __init__(self, moe: str = "auto", external_at: int | None = None):
        self.moe, self.external_at = moe, external_at  # MoE lowering; external data threshold

    # ------------------------------------------------------------------ refusals
    def configure(self, options) -> None:
        """Refuse flags that plan for llama.cpp before any model is read; keep the MoE
        lowering asked for."""
        self.moe = options.onnx_moe
        for flag, value in (("--gpu-mem", options.gpu_mem), ("--allow-prune", options.allow_prune)):
            if value:
                raise UserError(f"{flag} plans for llama.cpp; it does not apply to --target onnx")
        if options.quant is not None and options.quant not in (*TYPES, "auto"):
            raise UserError(f"--quant {options.quant}: --target onnx takes {', '.join(TYPES)} or "
                            "auto (blocked weights for ONNX Runtime)")
        if options.quant == "auto" and not options.budget:
            raise UserError("--target onnx: --quant auto needs --budget SIZE (the memory it fits)")
        if options.dtype not in ("auto", "f32"):
            raise UserError(f"--dtype {options.dtype}: --target onnx writes float32 weights (or "
                            "int8/int4 with --quant)")

    def check(self, model: ir.Model) -> None:
        lower.check_exportable(model)

    # ------------------------------------------------------------------ types
    def choose_types(self, model: ir.Model, request: TypeRequest, ctx,
                     variants=None) -> TypePlan:
        """The types `request` asks for. `--budget` alone asks for the most faithful file that
        fits: float32 if it fits, else types chosen per expert by measured sensitivity."""
        self.check(model)
        weights = linear_weights(model)
        lines: list[str] = []
        if request.fits_budget:
            lossless = self._typed_plan(model, request, {}, "dtype", "f32", check=False)
            total = lossless.report["memory"]["total_bytes"]
            if total <= request.budget:
                lossless.lines.insert(0, f"--budget {request.budget_text}: the float32 file fits")
                return lossless
            lines.append(f"--budget {request.budget_text}: the float32 file needs "
                         f"{format_size(total)}; choosing types per expert by measured "
                         "sensitivity")
        if request.quant == "auto" or request.fits_budget:
            chosen, quant, auto_lines = self._auto(model, request, weights, ctx)
            plan = self._typed_plan(model, request, chosen, "auto", "mixed")
            plan.report["quant"] = quant
            plan.lines[:0] = lines + auto_lines
            return plan
        if request.quant:
            return self._typed_plan(model, request, {p: request.quant for p in weights},
                                    "uniform", request.quant)
        if request.quant_map:
            path = Path(request.quant_map)
            chosen = match_rules(path, read_rules(path, _parse_type), weights)
            return self._typed_plan(model, request, chosen, "map", "mixed")
        return self._typed_plan(model, request, {}, "dtype", "f32")

    def _typed_plan(self, model: ir.Model, request: TypeRequest, chosen: dict[str, str],
                    method: str, label: str, check: bool = True) -> TypePlan:
        """The plan for IR path -> type `chosen` (the rest float32); with a budget, the
        memory (weights + float32 KV cache for --ctx) is reported and checked."""
        types = {p: "f32" for p, _ in model.tensors()}
        types.update(chosen)
        typed = model.with_types(types)
        typed = typed.with_history(types_entry(self.name, method, label, typed))
        weights = lower.weight_bytes(typed)
        report: dict = {}
        lines: list[str] = []
        stay = width_fallbacks(model) if chosen else []
        if stay:
            report["width_fallbacks"] = stay
            lines.append(f"note: down projections of widths {stay} stay float32 (int4/int8 "
                         f"blocks of {oq.BLOCK} need widths in multiples of {oq.BLOCK})")
        if request.budget is not None:
            n_ctx = resolve_ctx(model, request.ctx)
            kv = kv_cache_bytes(model, n_ctx)
            report["memory"] = {"weights_bytes": weights, "kv_cache_bytes": kv, "ctx": n_ctx,
                                "total_bytes": weights + kv, "budget_bytes": request.budget}
            lines.append(f"memory: weights {format_size(weights)} + float32 KV cache "
                         f"{format_size(kv)} for --ctx {n_ctx} = {format_size(weights + kv)} of "
                         f"--budget {format_size(request.budget)} (ONNX Runtime's own arena is "
                         "not counted)")
            if weights + kv > request.budget and method != "auto" and check:
                raise UserError(f"--budget {request.budget_text}: this configuration needs "
                                f"{format_size(weights + kv)}; leave out the type flags to let "
                                "--budget choose")
        return TypePlan(typed, label, weights, report, lines)

    def _auto(self, model: ir.Model, request: TypeRequest, weights: list[str], ctx):
        """Per-unit types by measured sensitivity under the budget; a budget even int4 does not
        reach is refused before anything is measured."""
        n_ctx = resolve_ctx(model, request.ctx)
        kv = kv_cache_bytes(model, n_ctx)
        tensors = model.tensor_map()
        units: dict[str, list[str]] = {}
        for path in weights:
            units.setdefault(unit_of(path), []).append(path)

        def unit_bytes(unit: str, kind: str) -> int:
            return sum(oq.stored_bytes(tensors[p].numel, None if kind == "f32" else kind)
                       for p in units[unit])

        fixed = lower.weight_bytes(model.with_types({})) - sum(unit_bytes(u, "f32") for u in units)
        smallest = fixed + sum(unit_bytes(u, CANDIDATES[-1]) for u in units)
        if smallest + kv > request.budget:
            raise UserError(f"--budget {request.budget_text} is below the smallest reachable "
                            f"size {format_size(smallest + kv)} (int4 weights "
                            f"{format_size(smallest)} + float32 KV cache for --ctx {n_ctx} "
                            f"{format_size(kv)})")
        calib = ctx.calibration(model, "--quant auto")

        @contextmanager
        def rounded(kind: str | None, types: dict[str, str] | None = None):
            def value(path: str, tensor: ir.Tensor) -> torch.Tensor:
                return torch.from_numpy(oq.roundtrip(tensor.value().float().numpy(),
                                                     kind or types[path]))
            yield value

        local = request.sensitivity == "local" or (request.sensitivity == "auto"
                                                   and streams(model))
        if local:
            measured, info, check = sensitivity.local_losses(
                model, calib, units, list(CANDIDATES[1:]), rounded, CANDIDATES[-1],
                ctx.device, ctx.progress, ctx.engine, held_out(model, calib))
        else:
            measured = sensitivity.measure(model, calib, units, list(CANDIDATES[1:]), rounded,
                                           ctx.device, ctx.progress, ctx.engine)
        sens = {u: {"f32": 0.0, **measured[u]} for u in units}

        def typed(unit_types: dict[str, str]) -> dict[str, str]:
            return {p: kind for u, kind in unit_types.items() if kind != "f32" for p in units[u]}

        def measure(unit_types: dict[str, str]) -> float:
            with rounded(None, typed(unit_types)) as value:
                return check(set(typed(unit_types)), value)

        unit_types, total, predicted, extra, tail = allocate.choose_reported(
            sens, unit_bytes, fixed, request.budget - kv,
            (lambda u: ".experts." in u, measure, info) if local else None)
        chosen = typed(unit_types)
        quant = {"method": "auto", "calib": calib.spec, "predicted_kl": predicted,
                 "units": unit_types, "sensitivity": sens, **extra}
        line = (f"quant auto: {len(unit_types)} units, weights {format_size(total)}, predicted "
                f"KL {predicted:.4f}{tail}")
        return chosen, quant, [line] + type_table(unit_types, _unit_kind)

    # ------------------------------------------------------------------ commit
    def commit(self, plan: TypePlan, out: Path, verify: bool = True, device: str | None = None,
               progress: bool = True) -> Committed:
        """model.onnx (+ model.onnx.data) in a temporary folder → verify in ONNX Runtime → move
        beside the output with genai_config.json and the tokenizer files. A failed verification
        keeps the model as OUT.FAILED.onnx; an error or Ctrl-C removes the temporary folder."""
        model = plan.model
        tmp = temp_path(out)
        tries = _lowerings(self.moe, verify)
        kwargs = {} if self.external_at is None else {"external_at": self.external_at}
        attempts: list[dict] = []
        try:
            tmp.mkdir()
            for lowering in tries:
                staged = tmp / out.name
                try:
                    result = lower.export(model, staged, moe=lowering, progress=progress,
                                          **kwargs)
                except OSError as exc:
                    raise UserError(f"{out}: cannot write ({exc.strerror or exc})") from None
                verification = None
                if verify:
                    log.info("verifying %s in onnxruntime against the reference executor (%s "
                             "MoE)", out.name, lowering)
                    try:
                        verification = self.verify(model, staged, device)
                    except VerificationError as exc:
                        if lowering == tries[-1]:
                            raise
                        attempts.append({"moe": lowering, "error": str(exc)})
                        continue
                    if not verification.passed and lowering != tries[-1]:
                        attempts.append({"moe": lowering, "verification": verification.to_dict()})
                        continue
                break
            final = out if verification is None or verification.passed else failed_name(out)
            package.write_genai_config(model, tmp / "genai_config.json", final.name)
            package.copy_tokenizer(model, tmp)
            moved = package.move_into_place(tmp, staged, result.data_path, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fields = {
            "arch": "onnx decoder, MoE " + "/".join(sorted(set(result.lowering.values()))),
            "output": str(final),
            "files": [str(p) for p in moved],
            "passes": list(model.history),
            "moe_lowering": {str(k): v for k, v in result.lowering.items()},
            "rejected_lowerings": attempts,
            "weights": result.quant and {"quantized": result.quant, "block_size": oq.BLOCK} or "f32",
            "tensor_bytes": result.weight_bytes,
            "tensors": result.tensors,
            "file_bytes": sum(p.stat().st_size for p in moved if p.suffix in (".onnx", ".data")),
        }
        return Committed(final, moved, fields, verification)

    def verify_file(self, path: Path, model: ir.Model, device: str | None = None) -> FileVerdict:
        """An ONNX decoder from anywhere against the checkpoint: whether ONNX Runtime can
        compute the checkpoint at all, then the file run on the verification input (and through
        its KV cache) against the reference at the weight types the file holds. The reference
        computes from the checkpoint's own values, so a wrong value in the file shows in the
        logits."""
        findings = []
        try:
            self.check(model)
        except UserError as exc:
            findings.append(f"ONNX Runtime cannot compute this checkpoint faithfully: {exc}")
        types = reader.read_types(path, model)
        return FileVerdict(path, findings, self.verify(model.with_types(types), path, device))

    def verify(self, model: ir.Model, onnx_path: Path, device: str | None = None):
        """Run `onnx_path` in ONNX Runtime and compare with the reference on the file's
        numerics. The last CACHED_STEPS tokens of every sequence are also decoded one at a time
        through the KV cache; their logits must match the full pass, so a broken cache fails
        too."""
        from moecompile.runtime.onnx_runner import OnnxDecoder

        tokens = verification_tokens(model).astype(np.int64)
        batch, length = tokens.shape
        cut = max(1, length - CACHED_STEPS)
        try:  # an op this onnxruntime (or provider) lacks fails here: a reason, not a crash
            decoder = OnnxDecoder(onnx_path, device)
            got, cache = decoder.step(tokens, np.ones_like(tokens), decoder.empty_cache(batch))
            # keys and values at positions < cut depend on those tokens only: the prefix's cache
            cache = {name: kv[:, :, :cut] for name, kv in cache.items()}
            stepped = []
            for t in range(cut, length):
                logits, cache = decoder.step(tokens[:, t:t + 1], np.ones((batch, t + 1), np.int64),
                                             cache)
                stepped.append(logits[:, -1])
        except MemoryError:
            raise
        except Exception as exc:  # onnxruntime's own exception types differ by version
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise VerificationError(f"onnxruntime could not run {onnx_path.name}: {first}") from None
        # the same tokens through the KV cache: the rule that judges the full pass judges them
        # (a fixed tolerance here failed correct int4 files of loud models by rounding flips)
        cached = got.copy()
        cached[:, cut:] = np.stack(stepped, 1)
        provider = decoder.session.get_providers()[0].replace("ExecutionProvider", "")
        return compare_with_reference(f"onnxruntime ({provider})", got, model, tokens,
                                      OnnxNumerics(model), device,
                                      {"decoded through the KV cache": cached})


def _lowerings(moe: str, verify: bool) -> list[str]:
    """The forms to try in order. Unverified, auto takes the fused kernels only where they are
    known to be right: ORT ≥ 1.24 (1.23's CPU QMoE gave wrong 4-bit results)."""
    if moe != "auto":
        return [moe]
    if verify:
        return ["ort", "portable"]
    import onnxruntime

    version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2])
    return ["ort"] if version >= (1, 24) else ["portable"]
