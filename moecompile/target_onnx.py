"""`--target onnx` behind the command line: which flags apply, which weights are quantized, and
the compile call.

Weight types here are per IR tensor, so a layer's experts may differ in precision (the portable
MoE lowering holds them one by one; llama.cpp can only type a whole stacked layer tensor):
`--quant int8|int4` quantizes every linear weight; `--quant-map FILE.json` takes
{"IR tensor-path regex": "int4" | "int8" | "f32"} (paths as the report names them, e.g.
`blocks\\.0\\.ffn\\.experts\\.3\\.`), first match wins; `--quant auto --budget SIZE --calib
DATA` chooses per expert by measured sensitivity (passes/quantize_onnx.py). The budget here is
weights + the float32 KV cache for `--ctx` tokens: ONNX Runtime's activation arena is not
modelled.
"""

from __future__ import annotations

from pathlib import Path

from . import ir
from .errors import UserError

TYPES = ("int8", "int4")


def check_args(args) -> None:
    """Refuse flags that plan for llama.cpp before any model is read."""
    for flag, value in (("--gpu-mem", args.gpu_mem), ("--allow-prune", args.allow_prune)):
        if value:
            raise UserError(f"{flag} plans for llama.cpp; it does not apply to --target onnx")
    if args.quant is not None and args.quant not in (*TYPES, "auto"):
        raise UserError(f"--quant {args.quant}: --target onnx takes {', '.join(TYPES)} or auto "
                        "(blocked weights for ONNX Runtime)")
    if (args.quant == "auto") != bool(args.budget) or (args.quant == "auto" and not args.calib):
        raise UserError("--target onnx: --quant auto needs --budget SIZE and --calib (the data "
                        "its sensitivity is measured on), and --budget needs --quant auto")
    if args.dtype not in ("auto", "f32"):
        raise UserError(f"--dtype {args.dtype}: --target onnx writes float32 weights (or "
                        "int8/int4 with --quant)")


def linear_weights(model: ir.Model) -> dict[int, str]:
    """IR tensors the ONNX graph multiplies as linear layers (id -> path): attention, experts,
    shared experts, dense MLPs and an untied output head. Routers, the shared-expert gate and
    the embedding stay float32."""
    out = {}
    for name, t in model.tensors():
        leaf = name.rsplit(".", 1)[-1]
        if len(t.shape) != 2 or ".router." in name or name.endswith("shared.gate"):
            continue
        if name == "embed" or (name == "lm_head" and model.lm_head is model.embed):
            continue
        if leaf in ("q", "k", "v", "o", "gate", "up", "down", "lm_head"):
            out[id(t)] = name
    return out


def quant_types(model: ir.Model, args) -> tuple[dict[int, str] | None, dict]:
    """(IR tensor id -> "int8"/"int4", report entries)."""
    from .passes.quantize import match_rules, read_rules

    weights = linear_weights(model)
    if args.quant == "auto":
        return _auto(model, args, weights)
    if args.quant:
        return {k: args.quant for k in weights}, {}
    if not args.quant_map:
        return None, {}
    path = Path(args.quant_map)
    chosen = match_rules(path, read_rules(path, _parse_type), list(weights.values()))
    return {k: chosen[name] for k, name in weights.items() if chosen[name] != "f32"}, {}


def _auto(model: ir.Model, args, weights: dict[int, str]) -> tuple[dict[int, str], dict]:
    from .budget import format_size, parse_size
    from .exporters.onnx import kv_cache_bytes
    from .passes import quantize, quantize_onnx
    from .passes.calib import build_calib
    from .pipeline import resolve_ctx
    from .runtime.executor import default_device

    ctx = resolve_ctx(model, args)
    budget = parse_size(args.budget)
    kv = kv_cache_bytes(model, ctx)
    groups = quantize_onnx.units(model, weights)
    calib = build_calib(model, args.calib, args.calib_n)
    sens = quantize_onnx.sensitivity(model, groups, calib, args.device or default_device(),
                                     progress=not args.quiet)
    try:
        quant, unit_types, total, predicted = quantize_onnx.allocate(model, groups, sens,
                                                                     budget - kv)
    except quantize.BudgetError as exc:
        raise UserError(f"--budget {args.budget} is below the smallest reachable size "
                        f"{format_size(exc.smallest_weights + kv)} (int4 weights "
                        f"{format_size(exc.smallest_weights)} + float32 KV cache for --ctx {ctx} "
                        f"{format_size(kv)})") from None
    print(f"quant auto: {len(unit_types)} units, weights {format_size(total)}, predicted KL "
          f"{predicted:.4f}")
    return quant, {"quant": {"method": "auto", "calib": args.calib, "predicted_kl": predicted,
                             "units": unit_types, "sensitivity": sens},
                   "memory": {"weights_bytes": total, "kv_cache_bytes": kv, "ctx": ctx,
                              "total_bytes": total + kv, "budget_bytes": budget}}


def _parse_type(name: str) -> str:
    if name not in (*TYPES, "f32"):
        raise UserError(f"--quant-map: type {name!r}: --target onnx takes int8, int4 or f32")
    return name


def compile_model(model: ir.Model, args, out: Path):
    from .compile_onnx import compile_onnx

    quant, extra = quant_types(model, args)
    return compile_onnx(model, out, moe=args.onnx_moe, quant=quant, verify=not args.no_verify,
                        device=args.device, progress=not args.quiet, extra_report=extra)
