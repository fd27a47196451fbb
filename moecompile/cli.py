"""`moecompile MODEL --target gguf -o OUT.gguf`: the command line.

Exit codes: 0 success, 1 the export failed verification (the file is kept under a name that
says so), 2 bad input or an impossible request (one line on stderr, nothing written),
3 an internal error (a bug), 130 interrupted (nothing left behind).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import UserError, VerificationError

log = logging.getLogger("moecompile")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moecompile",
        description="Compile a Hugging Face Mixture-of-Experts checkpoint into a verified "
                    "GGUF file for llama.cpp.")
    p.add_argument("model", help="Hugging Face checkpoint folder (config.json + safetensors)")
    p.add_argument("--target", choices=["gguf", "onnx"], default="gguf")
    p.add_argument("-o", "--output", help="output file, or a folder (ending in /) to write into")
    p.add_argument("--dtype", choices=["auto", "f32", "f16", "bf16", "q8_0"], default="auto",
                   help="weight type of the export; auto (default) keeps a bf16 source in bf16 "
                        "and writes f16 otherwise. Routers and norms stay F32")
    p.add_argument("--quant", metavar="TYPE|auto",
                   help="weight types through llama.cpp's quantizer: one type for every weight "
                        "(q8_0, q6_k, q5_k, q4_k, iq4_xs, q3_k, q2_k, f16, bf16) or auto "
                        "(chosen per tensor by measured sensitivity; needs --calib and --budget)")
    p.add_argument("--quant-map", metavar="FILE.json",
                   help='per-tensor types: {"GGUF tensor-name regex": "type", ...}, first match wins')
    p.add_argument("--budget", metavar="SIZE",
                   help="total runtime memory to fit (weights + KV cache for --ctx + compute "
                        "buffers), e.g. 24GB, 8GiB, 512MB or bytes")
    p.add_argument("--ctx", type=int, default=None, help="context length the memory is planned "
                   "for (default 4096, or the model's context if shorter)")
    p.add_argument("--gpu-mem", metavar="SIZE",
                   help="plan GPU/RAM placement for a GPU of this size (prints a llama-server "
                        "command line); with --ram")
    p.add_argument("--ram", metavar="SIZE", help="system RAM available to the offload plan")
    p.add_argument("--print-ir", action="store_true", help="print the IR and exit unless -o given")
    prune = p.add_argument_group("expert pruning")
    prune.add_argument("--experts", type=int, metavar="N",
                       help="keep N experts in every MoE layer (needs --calib)")
    prune.add_argument("--prune-method", default="eep",
                       choices=["eep", "frequency", "mass", "random", "reconstruct"],
                       help="eep (default): evolutionary search over kept and merged experts; "
                            "or a baseline")
    prune.add_argument("--calib", metavar="TASKS|FILE",
                       help="calibration data: suite task names (add,sort or all), a .jsonl of "
                            "prompt/answer pairs (fitness: exact match) or a .txt (fitness: "
                            "agreement with the original model)")
    prune.add_argument("--calib-n", type=int, default=32, metavar="N",
                       help="examples per task, lines of a .jsonl or chunks of a .txt (32)")
    prune.add_argument("--search-budget", metavar="EVALS|TIME",
                       help="EEP search length: evaluations (default 400) or a time (90s, 5m)")
    prune.add_argument("--seed", type=int, default=0, help="seed of the search and of random")
    trim = p.add_argument_group("active experts and trimming (applied after --experts, in this order)")
    trim.add_argument("--top-k", type=int, metavar="K",
                      help="route each token to K experts instead of the model's own top-k")
    trim.add_argument("--topk-method", choices=["plain", "search"], default="search",
                      help="search (default, needs --calib): EEP merge/router search under top-K; "
                           "plain: just lower k")
    trim.add_argument("--drop-blocks", type=int, default=0, metavar="M",
                      help="remove the M blocks whose output is most similar to their input")
    trim.add_argument("--drop-moe-layers", type=int, default=0, metavar="M",
                      help="remove the MoE sublayer (attention kept) of the M least important "
                           "blocks; not expressible in GGUF")
    p.add_argument("--no-verify", action="store_true",
                   help="skip running the export in its runtime against the reference")
    p.add_argument("--device", default=None, help="torch device of the reference executor "
                   "(default: cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"moecompile {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="moecompile: %(message)s", stream=sys.stderr)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its INFO lines name our temp file
    try:
        return run(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"moecompile: error: {exc}", file=sys.stderr)
        return 2
    except VerificationError as exc:
        if args.debug:
            raise
        print(f"moecompile: verification failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moecompile: interrupted; nothing was written", file=sys.stderr)
        return 130
    except OSError as exc:  # a path the user gave cannot be read or written
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"moecompile: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: say so in one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"moecompile: internal error: {type(exc).__name__}: {exc} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 3


def run(args: argparse.Namespace) -> int:
    from . import frontend
    from .compile import compile_gguf
    from .ir import format_ir

    budget = _check_pass_args(args)
    model = frontend.load(args.model)
    model = _apply_passes(model, args, budget)
    if args.print_ir:
        print(format_ir(model))
        if not args.output:
            return 0
    if not args.output:
        raise UserError("no output given: use -o OUT.gguf (or --print-ir to inspect the model)")
    if args.target != "gguf":
        raise UserError(f"target '{args.target}' is not implemented yet (available: gguf)")
    dtype = args.dtype if args.dtype != "auto" else auto_dtype(model)
    out = resolve_output(args.output, model.source, args.quant or dtype)
    quant, imatrix, extra = _quant_types(model, args, out)
    if quant is not None and not args.quant:
        out = resolve_output(args.output, model.source, "mixed")
    result = compile_gguf(model, out, dtype=dtype, verify=not args.no_verify, quant=quant,
                          imatrix=imatrix, extra_report=extra,
                          device=args.device, progress=not args.quiet)
    print(result.summary())
    if args.gpu_mem:
        _offload(model, args, result)
    return 0 if result.passed else 1


def _offload(model, args, result) -> None:
    from .budget import format_size, parse_size
    from .compile import write_json_atomic
    from .passes import offload

    tensors = [(t["name"], t["bytes"]) for t in result.report["tensors"]]
    ram = parse_size(args.ram, "--ram") if args.ram else 1 << 62
    p = offload.plan(model, tensors, result.output.name, args.ctx, parse_size(args.gpu_mem,
                     "--gpu-mem"), ram)
    print(f"offload plan: GPU {format_size(p.gpu_bytes)} ({len(p.gpu)} tensors + KV cache + "
          f"compute), RAM {format_size(p.ram_bytes)} ({len(p.cpu)} tensors + compute)")
    print(f"  {p.command}")
    print(f"  llama-cpp-python: Llama(model_path=..., n_gpu_layers={p.python_args['n_gpu_layers']}, "
          f"n_ctx={p.python_args['n_ctx']}): {p.python_note}")
    result.report["offload"] = p.to_dict()
    write_json_atomic(result.report_path, result.report)


def _check_pass_args(args) -> tuple[int, float | None]:
    """Validate the compression flags before any model is read."""
    from .passes.prune import parse_search_budget

    searched = args.experts is not None or (args.top_k is not None and args.topk_method == "search")
    calibrated = searched or args.drop_blocks or args.drop_moe_layers
    if not calibrated and args.quant != "auto" and (args.calib or args.search_budget):
        raise UserError("--calib/--search-budget only apply with --experts, --top-k, "
                        "--drop-blocks, --drop-moe-layers or --quant auto")
    if args.search_budget and not searched:
        raise UserError("--search-budget only applies to --experts or --top-k with search")
    from .budget import parse_size

    for flag, value in (("--budget", args.budget), ("--gpu-mem", args.gpu_mem), ("--ram", args.ram)):
        if value is not None:
            parse_size(value, flag)  # malformed sizes fail before any model is read
    if args.ram and not args.gpu_mem:
        raise UserError("--ram only applies with --gpu-mem")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k {args.top_k}: must be at least 1")
    if args.top_k is not None and args.experts is not None and args.top_k > args.experts:
        raise UserError(f"--top-k {args.top_k} exceeds the {args.experts} experts kept by --experts")
    if args.drop_blocks < 0 or args.drop_moe_layers < 0:
        raise UserError("--drop-blocks/--drop-moe-layers must not be negative")
    if args.drop_moe_layers and args.target == "gguf":
        raise UserError("--drop-moe-layers: llama.cpp's MoE graphs have no form for a block "
                        "without an FFN, so GGUF cannot hold the result; use --drop-blocks, or "
                        "a target that can express it (ONNX)")
    if calibrated and not args.calib:
        what = ("--experts" if args.experts is not None else "--top-k (search)" if searched
                else "--drop-blocks/--drop-moe-layers")
        raise UserError(f"{what} needs calibration data: --calib TASKS (e.g. add,sort or all), "
                        "--calib FILE.jsonl or --calib FILE.txt")
    if args.calib_n < 1:
        raise UserError(f"--calib-n {args.calib_n}: must be at least 1")
    return parse_search_budget(args.search_budget)


def _apply_passes(model, args, budget: tuple[int, float | None]):
    """--experts, then --top-k, then --drop-blocks, then --drop-moe-layers."""
    from .passes.eep import EEPConfig
    from .passes.topk import reduce_top_k
    from .passes.trim import trim
    from .runtime.executor import default_device

    device = args.device or default_device()
    evaluations, seconds = budget
    if args.experts is not None:
        model = _prune(model, args, budget)
    if args.top_k is not None:
        config = EEPConfig(evaluations=evaluations, seconds=seconds, seed=args.seed)
        model, report = reduce_top_k(model, args.top_k, args.topk_method, args.calib,
                                     calib_n=args.calib_n, seed=args.seed, config=config,
                                     device=device, progress=not args.quiet)
        line = f"top-k {report['top_k_before']} -> {args.top_k} ({args.topk_method})"
        if args.top_k == report["top_k_before"]:
            line += ": unchanged"
        if "fitness" in report:
            line += (f": calibration fitness {report['fitness']:.4f} (top-{report['top_k_before']} "
                     f"{report['fitness_before']:.4f}, plain top-{args.top_k} "
                     f"{report['fitness_plain']:.4f})")
        print(line)
    for kind, m in (("blocks", args.drop_blocks), ("moe_layers", args.drop_moe_layers)):
        if m:
            model, report = trim(model, kind, m, args.calib, calib_n=args.calib_n, device=device)
            print(f"dropped {kind.replace('_', ' ')} {report['dropped']}: calibration fitness "
                  f"{report['fitness']:.4f} (before {report['fitness_before']:.4f})")
    return model


def _prune(model, args, budget: tuple[int, float | None]):
    from .passes.eep import EEPConfig
    from .passes.prune import prune_experts
    from .runtime.executor import default_device

    evaluations, seconds = budget
    config = EEPConfig(evaluations=evaluations, seconds=seconds, seed=args.seed)
    model, report = prune_experts(
        model, args.experts, args.prune_method, args.calib, calib_n=args.calib_n,
        seed=args.seed, config=config, router_mode="onehot",
        device=args.device or default_device(), progress=not args.quiet)
    line = (f"pruned to {args.experts} of {report['experts_before']} experts per layer by "
            f"{args.prune_method}: calibration fitness {report['fitness']:.4f} "
            f"(unpruned {report['fitness_unpruned']:.4f}")
    if "baseline_fitness" in report:
        best = max(report["baseline_fitness"].items(), key=lambda kv: kv[1])
        line += f"; best baseline {best[0]} {best[1]:.4f}"
    print(line + f"; {report['seconds']:.0f} s)")
    return model


def _quant_types(model, args, out: Path):
    """(GGUF name -> type or None for a plain --dtype export, imatrix, report entries)."""
    from .budget import format_size, memory, parse_size
    from .passes import quantize

    if args.quant and args.quant_map:
        raise UserError("give --quant or --quant-map, not both")
    if args.ctx is None:
        args.ctx = min(4096, model.context_length)
    if args.ctx < 1 or args.ctx > model.context_length:
        raise UserError(f"--ctx {args.ctx}: must be between 1 and the model's context of "
                        f"{model.context_length}")
    budget = parse_size(args.budget) if args.budget else None
    extra: dict = {"ctx": args.ctx}
    imatrix = None
    if args.quant == "auto":
        if budget is None or not args.calib:
            raise UserError("--quant auto needs --budget SIZE and --calib (the data its "
                            "sensitivity is measured on)")
        types, imatrix, extra["quant"] = _auto_types(model, args, budget, out)
    elif args.quant_map:
        types = quantize.from_map(model, Path(args.quant_map))
    elif args.quant:
        types = quantize.uniform(model, args.quant)
    else:
        types = None
    if types is not None:
        weights = quantize.weight_bytes(model, types)
    else:
        from .exporters import gguf as gguf_export

        arch = gguf_export.check_exportable(model)
        dtype = args.dtype if args.dtype != "auto" else auto_dtype(model)
        weights = sum(t.nbytes for t in gguf_export.plan(model, dtype, arch))
    mem = memory(model, weights, args.ctx)
    extra["memory"] = mem.to_dict()
    if budget is not None:
        extra["budget_bytes"] = budget
        if mem.total_bytes > budget:
            raise UserError(f"--budget {args.budget}: this configuration needs "
                            f"{format_size(mem.total_bytes)} (weights "
                            f"{format_size(mem.weights_bytes)} + KV cache "
                            f"{format_size(mem.kv_cache_bytes)} for --ctx {args.ctx} + compute "
                            f"{format_size(mem.compute_bytes)}); try --quant auto")
    return types, imatrix, extra


def _auto_types(model, args, budget: int, out: Path):
    """--quant auto: measured sensitivity, then the lowest predicted loss that fits."""
    from .budget import compute_bytes, format_size, kv_cache_bytes
    from .passes import imatrix as imatrix_pass
    from .passes import quantize
    from .passes.calib import build_calib
    from .runtime.executor import default_device

    fixed = kv_cache_bytes(model, args.ctx) + compute_bytes(model, args.ctx)
    device = args.device or default_device()
    calib = build_calib(model, args.calib, args.calib_n)
    imat, calls = imatrix_pass.collect(model, calib, device)
    sens = quantize.sensitivity(model, calib, imatrix=imat, device=device,
                                workdir=out.parent, progress=not args.quiet)
    try:
        chosen = quantize.allocate(model, sens, budget - fixed)
    except quantize.BudgetError as exc:
        raise UserError(
            f"--budget {args.budget} is below the smallest reachable size "
            f"{format_size(exc.smallest_weights + fixed)} (weights at the smallest types "
            f"{format_size(exc.smallest_weights)} + KV cache and compute for --ctx {args.ctx} "
            f"{format_size(fixed)}){_prune_hint(model, sens, budget - fixed)}") from None
    dat = out.with_suffix(".imatrix.dat")
    imatrix_pass.write_dat(dat, imat, calls)
    print(f"quant auto: {len(chosen.group_types)} groups, weights "
          f"{format_size(chosen.weight_bytes)}, predicted KL {chosen.predicted_kl:.4f}; "
          f"imatrix {dat}")
    report = {"method": "auto", "calib": args.calib, "predicted_kl": chosen.predicted_kl,
              "groups": chosen.group_types, "sensitivity": sens, "imatrix_file": str(dat)}
    return chosen.types, imat, report


def _prune_hint(model, sens, weight_budget: int) -> str:
    """Which --experts N would make the smallest types fit, if any."""
    from .passes import quantize

    by_group = quantize.groups(model)
    smallest = {g: min(sum(s.bytes_at(quantize.gq.TYPES[n]) for s in ss) for n in sens[g])
                for g, ss in by_group.items()}
    experts = sum(v for g, v in smallest.items() if g.endswith("_exps"))
    rest = sum(v for g, v in smallest.items() if not g.endswith("_exps")) + sum(
        s.bytes_at(quantize.Q.F32) for s in quantize.slots(model) if not s.quantizable)
    n_experts = max(b.ffn.n_experts for b in model.blocks if b.ffn is not None and hasattr(b.ffn, "n_experts"))
    if experts == 0:
        return ""
    fits = int((weight_budget - rest) / (experts / n_experts))
    if fits >= 1:
        return f"; pruning to --experts {min(fits, n_experts - 1)} would fit"
    return "; even one expert per layer would not fit"


def auto_dtype(model) -> str:
    """bf16 for a bf16 checkpoint (lossless), f16 otherwise — as llama.cpp's converter does."""
    return "bf16" if model.blocks[0].ffn_norm.dtype == "bf16" or model.embed.dtype == "bf16" else "f16"


def resolve_output(output: str, source: str, dtype: str) -> Path:
    """OUT.gguf as given, or DIR/<model>-<dtype>.gguf for a folder; check it can be written."""
    out = Path(output)
    if output.endswith(("/", "\\")) or out.is_dir():
        if not out.exists() and out.parent.is_dir():
            out.mkdir()  # `-o out/` names a folder to write into: create one level, like cp
        out = out / f"{Path(source).name}-{dtype}.gguf"
    if out.suffix != ".gguf":
        raise UserError(f"{out}: output for --target gguf must end in .gguf")
    parent = out.parent
    if not parent.exists():
        raise UserError(f"{out}: output folder {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{out}: {parent} is not a folder")
    if out.is_dir():
        raise UserError(f"{out}: is a folder")
    return out


if __name__ == "__main__":
    sys.exit(main())
