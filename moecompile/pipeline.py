"""The compile pipeline behind the command line: check the flags, run the passes in their
documented order (--experts, --top-k, --drop-blocks, --drop-moe-layers), choose weight types
(--quant / --quant-map / --quant auto under --budget) and plan offloading (--gpu-mem).

Each step takes the parsed arguments, so cli.py stays the parser and the exit-code policy.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


def auto_dtype(model) -> str:
    """bf16 for a bf16 checkpoint (lossless), f16 otherwise — as llama.cpp's converter does."""
    return "bf16" if model.blocks[0].ffn_norm.dtype == "bf16" or model.embed.dtype == "bf16" else "f16"


def check_args(args) -> tuple[int, float | None]:
    """Validate the compression flags before any model is read."""
    from .budget import parse_size
    from .passes.prune import parse_search_budget

    searched = (args.experts is not None or args.allow_prune
                or (args.top_k is not None and args.topk_method == "search"))
    calibrated = searched or args.drop_blocks or args.drop_moe_layers
    quantized = bool(args.quant or args.quant_map)
    if not calibrated and not quantized and (args.calib or args.search_budget):
        raise UserError("--calib/--search-budget only apply with --experts, --top-k, "
                        "--drop-blocks, --drop-moe-layers or --quant/--quant-map (importance "
                        "matrix)")
    if args.search_budget and not searched:
        raise UserError("--search-budget only applies to --experts, --allow-prune or --top-k "
                        "with search")
    for flag, value in (("--budget", args.budget), ("--gpu-mem", args.gpu_mem), ("--ram", args.ram)):
        if value is not None:
            parse_size(value, flag)  # malformed sizes fail before any model is read
    if args.ram and not args.gpu_mem:
        raise UserError("--ram only applies with --gpu-mem")
    if args.allow_prune and (args.quant != "auto" or args.experts is not None):
        raise UserError("--allow-prune applies to --quant auto without --experts")
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
    if args.quant and args.quant_map:
        raise UserError("give --quant or --quant-map, not both")
    return parse_search_budget(args.search_budget)


def apply_passes(model, args, budget: tuple[int, float | None]):
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
        seed=args.seed, config=config, router_mode=_router_mode(args),
        device=args.device or default_device(), progress=not args.quiet)
    line = (f"pruned to {args.experts} of {report['experts_before']} experts per layer by "
            f"{args.prune_method}: calibration fitness {report['fitness']:.4f} "
            f"(unpruned {report['fitness_unpruned']:.4f}")
    if "baseline_fitness" in report:
        best = max(report["baseline_fitness"].items(), key=lambda kv: kv[1])
        line += f"; best baseline {best[0]} {best[1]:.4f}"
    print(line + f"; {report['seconds']:.0f} s)")
    return model


def _router_mode(args) -> str:
    """EEP's router: exact (softmax → mapping matrix → top-k) where the target computes it
    (ONNX), one-hot rows where its MoE graph is fixed (llama.cpp)."""
    return "exact" if args.target == "onnx" else "onehot"


def resolve_ctx(model, args) -> int:
    """--ctx, by default 4096 or the model's context if shorter; checked against the model."""
    ctx = min(4096, model.context_length) if args.ctx is None else args.ctx
    if not 1 <= ctx <= model.context_length:
        raise UserError(f"--ctx {ctx}: must be between 1 and the model's context of "
                        f"{model.context_length}")
    return ctx


def quant_types(model, args, out: Path):
    """(GGUF name -> type or None for a plain --dtype export, imatrix, report entries)."""
    from .budget import format_size, memory, parse_size
    from .passes import quantize

    args.ctx = resolve_ctx(model, args)
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
                            f"{format_size(mem.total_bytes)} ({mem.describe(args.ctx)}); try "
                            "--quant auto")
    if types is not None and args.calib and imatrix is None:
        imatrix = _imatrix(model, args)
    if imatrix is None:
        return types, None, extra
    _write_imatrix(imatrix, out)
    extra["imatrix_file"] = str(out.with_suffix(".imatrix.dat"))
    return types, imatrix[0], extra


def _auto_types(model, args, budget: int, out: Path):
    """--quant auto: measured sensitivity, then the lowest predicted loss that fits."""
    from .budget import context_bytes, format_size
    from .passes import quantize
    from .passes.calib import build_calib
    from .runtime.executor import default_device

    fixed = context_bytes(model, args.ctx)
    device = args.device or default_device()
    calib = build_calib(model, args.calib, args.calib_n)
    imat = _imatrix(model, args, calib)
    sens = quantize.sensitivity(model, calib, imatrix=imat[0], device=device,
                                workdir=out.parent, progress=not args.quiet)
    try:
        chosen = quantize.allocate(model, sens, budget - fixed)
    except quantize.BudgetError as exc:
        experts = _experts_that_fit(model, sens, budget - fixed)
        hint = ("; even one expert per layer would not fit" if experts is None else
                f"; pruning to --experts {experts} would fit (or add --allow-prune)")
        raise NeedsPruning(
            f"--budget {args.budget} is below the smallest reachable size "
            f"{format_size(exc.smallest_weights + fixed)} (weights at the smallest types "
            f"{format_size(exc.smallest_weights)} + KV cache, buffers and runtime for --ctx "
            f"{args.ctx} {format_size(fixed)}){hint}", experts) from None
    print(f"quant auto: {len(chosen.group_types)} groups, weights "
          f"{format_size(chosen.weight_bytes)}, predicted KL {chosen.predicted_kl:.4f}")
    report = {"method": "auto", "calib": args.calib, "predicted_kl": chosen.predicted_kl,
              "groups": chosen.group_types, "sensitivity": sens}
    return chosen.types, imat, report


def _imatrix(model, args, calib=None):
    """The importance matrix of the calibration data (GGUF name -> vector, number of calls)."""
    from .passes import imatrix as imatrix_pass
    from .passes.calib import build_calib
    from .runtime.executor import default_device

    calib = calib or build_calib(model, args.calib, args.calib_n)
    return imatrix_pass.collect(model, calib, args.device or default_device())


def _write_imatrix(imatrix, out: Path) -> None:
    """Beside the output as OUT.imatrix.dat (llama-imatrix's classic format), once the
    configuration is known to fit, so a refused request leaves nothing behind."""
    from .passes import imatrix as imatrix_pass

    values, calls = imatrix
    dat = out.with_suffix(".imatrix.dat")
    imatrix_pass.write_dat(dat, values, calls)
    print(f"importance matrix from {calls} calibration sequences: {dat}")


class NeedsPruning(UserError):
    """The budget is reachable only with fewer experts: `experts` per layer (None: not even 1)."""

    def __init__(self, message: str, experts: int | None):
        super().__init__(message)
        self.experts = experts


def _experts_that_fit(model, sens, weight_budget: int) -> int | None:
    """The most experts per layer with which the smallest types fit (expert tensors shrink in
    proportion; everything else stays)."""
    from .passes import quantize

    smallest = {g: min(quantize.group_bytes(ss, n) for n in sens[g])
                for g, ss in quantize.groups(model).items()}
    experts = sum(v for g, v in smallest.items() if g.endswith("_exps"))
    rest = sum(v for g, v in smallest.items() if not g.endswith("_exps"))
    rest += quantize.unquantized_bytes(model)
    n_experts = max(b.ffn.n_experts for b in model.blocks if hasattr(b.ffn, "n_experts"))
    fits = int((weight_budget - rest) / (experts / n_experts)) if experts else 0
    return min(fits, n_experts - 1) if fits >= 1 else None


def prune_for_budget(model, args, experts: int):
    """--allow-prune: prune to `experts` per layer with --prune-method on --calib."""
    from .passes.prune import parse_search_budget

    print(f"--allow-prune: pruning to {experts} experts per layer to meet --budget {args.budget}")
    args.experts = experts
    return _prune(model, args, parse_search_budget(args.search_budget))


def offload(model, args, result) -> None:
    """--gpu-mem: the placement plan for the compiled file, printed and added to the report."""
    from .budget import format_size, parse_size
    from .compile import write_json_atomic
    from .passes import offload

    tensors = [(t["name"], t["bytes"]) for t in result.report["tensors"]]
    ram = parse_size(args.ram, "--ram") if args.ram else 1 << 62
    p = offload.plan(model, tensors, result.output.name, args.ctx, parse_size(args.gpu_mem,
                     "--gpu-mem"), ram)
    print(f"offload plan: GPU {format_size(p.gpu_bytes)} ({len(p.gpu)} tensors + KV cache + "
          f"compute), RAM {format_size(p.ram_bytes)} ({len(p.cpu)} tensors + host buffers)")
    print(f"  {p.command}")
    print(f"  llama-cpp-python: Llama(model_path=..., n_gpu_layers={p.python_args['n_gpu_layers']}, "
          f"n_ctx={p.python_args['n_ctx']}): {p.python_note}")
    result.report["offload"] = p.to_dict()
    write_json_atomic(result.report_path, result.report)
