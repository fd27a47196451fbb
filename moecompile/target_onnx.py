"""`--target onnx` behind the command line: which flags apply, which weights are quantized, and
the compile call.

Weight types here are per IR tensor, so a layer's experts may differ in precision (the portable
MoE lowering holds them one by one; llama.cpp can only type a whole stacked layer tensor):
`--quant int8|int4` quantizes every linear weight; `--quant-map FILE.json` takes
{"IR tensor-path regex": "int4" | "int8" | "f32"} (paths as `--print-ir` and the report name
them, e.g. `blocks\\.0\\.ffn\\.experts\\.3\\.`), first match wins.
"""

from __future__ import annotations

from pathlib import Path

from . import ir
from .errors import UserError

TYPES = ("int8", "int4")
MOE_CHOICES = ("auto", "ort", "portable")


def check_args(args) -> None:
    """Refuse flags that plan for llama.cpp before any model is read."""
    for flag, value in (("--budget", args.budget), ("--gpu-mem", args.gpu_mem),
                        ("--allow-prune", args.allow_prune)):
        if value:
            raise UserError(f"{flag} plans memory for llama.cpp; with --target onnx choose "
                            "weights with --quant int8|int4 or --quant-map")
    if args.quant is not None and args.quant not in TYPES:
        raise UserError(f"--quant {args.quant}: --target onnx takes {' or '.join(TYPES)} "
                        "(blocked weights for ONNX Runtime)")
    if args.quant and args.quant_map:
        raise UserError("give --quant or --quant-map, not both")
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


def quant_types(model: ir.Model, args) -> dict[int, str] | None:
    from .passes.quantize import match_rules, read_rules

    weights = linear_weights(model)
    if args.quant:
        return {k: args.quant for k in weights}
    if not args.quant_map:
        return None
    path = Path(args.quant_map)
    chosen = match_rules(path, read_rules(path, _parse_type), list(weights.values()))
    return {k: chosen[name] for k, name in weights.items() if chosen[name] != "f32"}


def _parse_type(name: str) -> str:
    if name not in (*TYPES, "f32"):
        raise UserError(f"--quant-map: type {name!r}: --target onnx takes int8, int4 or f32")
    return name


def compile_model(model: ir.Model, args, out: Path):
    from .compile_onnx import compile_onnx

    return compile_onnx(model, out, moe=args.onnx_moe, quant=quant_types(model, args),
                        verify=not args.no_verify, device=args.device, progress=not args.quiet)
