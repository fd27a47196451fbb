"""`moecompile MODEL --target gguf -o OUT.gguf`: the command line.

It parses the flags into a frozen `Options`, runs the job (job.py) and maps what happens onto
exit codes: 0 success, 1 the export failed verification (the file is kept under a name that
says so), 2 bad input or an impossible request (one line on stderr, nothing written),
3 an internal error (a bug), 130 interrupted (nothing left behind). Nothing else lives here.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .errors import InternalError, UserError, VerificationError

log = logging.getLogger("moecompile")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moecompile",
        description="Compile a Hugging Face Mixture-of-Experts checkpoint into a verified "
                    "GGUF file for llama.cpp or ONNX model for ONNX Runtime.")
    p.add_argument("model", help="Hugging Face checkpoint folder (config.json + safetensors)")
    p.add_argument("--target", choices=["gguf", "onnx"], default="gguf",
                   help="gguf (llama.cpp, default) or onnx (ONNX Runtime: OUT.onnx, plus "
                        "OUT.onnx.data past 1.8 GB, genai_config.json and tokenizer files)")
    p.add_argument("--onnx-moe", choices=["auto", "ort", "portable"], default="auto",
                   help="MoE lowering for --target onnx: ort (ONNX Runtime's fused MoE/QMoE "
                        "kernels), portable (standard ONNX ops), auto (default: ort if it "
                        "verifies, else portable)")
    p.add_argument("-o", "--output", help="output file, or a folder (ending in /) to write into")
    p.add_argument("--dtype", choices=["auto", "f32", "f16", "bf16", "q8_0"], default="auto",
                   help="weight type of the export; auto (default) keeps a bf16 source in bf16 "
                        "and writes f16 otherwise. Routers and norms stay F32")
    p.add_argument("--quant", metavar="TYPE|auto",
                   help="weight types through llama.cpp's quantizer: one type for every weight "
                        "(q8_0, q6_k, q5_k, q4_k, q4_0, iq4_xs, q3_k, q2_k, f16, bf16) or auto "
                        "(chosen per tensor by measured sensitivity; needs --budget). "
                        "--target onnx: int8 or int4 (blocks of 32)")
    p.add_argument("--quant-map", metavar="FILE.json",
                   help='per-tensor types: {"GGUF tensor-name regex": "type", ...}, first match '
                        'wins; for --target onnx the names are IR paths (per expert) and the '
                        'types int8, int4, f32')
    p.add_argument("--budget", metavar="SIZE",
                   help="total runtime memory to fit (llama.cpp: weights + KV cache for --ctx + "
                        "compute and work buffers + runtime; onnx: weights + KV cache), e.g. "
                        "24GB, 8GiB, 512MB or bytes. Alone it writes the most faithful file "
                        "that fits: lossless if it fits, else types chosen by measured "
                        "sensitivity (as --quant auto); with a type flag it checks the fit")
    p.add_argument("--sensitivity", choices=["auto", "full", "local"], default="auto",
                   help="how --quant auto / --budget measure each type's cost: full (one "
                        "forward of the whole model per group and type), local (each "
                        "sub-layer's error on its cached input, fitted to KL by one probe, "
                        "about three passes in all; the chosen mix measured end to end); auto "
                        "(default): local for a model too large to run whole, else full")
    p.add_argument("--allow-prune", action="store_true",
                   help="with --budget: choose among expert count, expert width and weight "
                        "types by measured loss per byte saved (experts pruned by "
                        "--prune-method, widths by --width-method), instead of types alone")
    p.add_argument("--ctx", type=int, default=None, help="context length the memory is planned "
                   "for (default 4096, or the model's context if shorter)")
    p.add_argument("--gpu-mem", metavar="SIZE",
                   help="plan GPU/RAM placement for a GPU of this size (prints a llama-server "
                        "command line); with --ram")
    p.add_argument("--ram", metavar="SIZE", help="system RAM available to the offload plan")
    p.add_argument("--print-ir", action="store_true",
                   help="print the IR after the passes and the type choice (and stop there "
                        "unless -o is given)")
    p.add_argument("--plan", "--dry-run", action="store_true", dest="plan",
                   help="print the chosen configuration, its predicted bytes and memory and the "
                        "launch line, and write nothing")
    prune = p.add_argument_group("expert pruning")
    prune.add_argument("--experts", type=int, metavar="N",
                       help="keep N experts in every MoE layer (needs --calib)")
    prune.add_argument("--prune-method", default="eep",
                       choices=["eep", "frequency", "mass", "reap", "random", "reconstruct"],
                       help="eep (default): evolutionary search over kept and merged experts; "
                            "or a baseline")
    prune.add_argument("--calib", metavar="TASKS|FILE",
                       help="calibration data: suite task names (add,sort or all), a .jsonl of "
                            "prompt/answer pairs (fitness: exact match), a .txt (fitness: "
                            "agreement with the original model) or 'default'. Without it, "
                            "flags that need data use the model folder's moecompile.json "
                            "default, else the built-in mix of prose, code and numbers")
    prune.add_argument("--calib-n", type=int, default=32, metavar="N",
                       help="examples per task, lines of a .jsonl or chunks of a .txt (32)")
    prune.add_argument("--search-budget", metavar="EVALS|TIME",
                       help="EEP search length: evaluations (default 400) or a time (90s, 5m)")
    prune.add_argument("--search-batch", type=int, metavar="B",
                       help="children the search makes from one archive state (default 8): "
                            "how many candidates --ray workers score at once; the result is "
                            "the same with and without --ray")
    prune.add_argument("--seed", type=int, default=0, help="seed of the search and of random")
    slim = p.add_argument_group("expert slimming (narrower experts; applied after --experts)")
    slim.add_argument("--expert-width", metavar="W",
                      help="each routed expert keeps W of its intermediate neurons: a fraction "
                           "(0.75; rounded to whole quantization blocks where close), a neuron "
                           "count (192), or a comma list with one per MoE layer (not GGUF)")
    slim.add_argument("--shared-width", metavar="W",
                      help="the same for shared experts and dense MLP layers (left alone "
                           "unless given)")
    slim.add_argument("--width-method", default="wanda",
                      choices=["wanda", "activation", "weight", "random"],
                      help="neuron importance: wanda (default: down-column norm x RMS "
                           "activation on the tokens routed to the expert), activation, "
                           "weight, or random")
    slim.add_argument("--width-refit", choices=["lsq", "none"], default="lsq",
                      help="lsq (default): refit each down projection by ridge least squares "
                           "to reconstruct the expert's output on calibration data; none: "
                           "plain slice")
    slim.add_argument("--width-data", choices=["calib+mix", "calib"], default="calib+mix",
                      help="what the importances and the refit are computed on: calib+mix "
                           "(default): the calibration and as many chunks of the built-in "
                           "general text mix, so prompts outside the calibration keep what "
                           "they use; calib: the calibration alone (a model for that data "
                           "only)")
    trim = p.add_argument_group("active experts and trimming (applied after --experts and "
                                "--expert-width, in this order)")
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
    p.add_argument("--ray", metavar="ADDRESS",
                   help="spread calibration work (search candidates, token shards) over Ray "
                        "workers: local:N (a cluster on this machine with N workers, for this "
                        "run), auto (the cluster `ray start --head` runs here) or HOST:PORT "
                        "(its head). Needs pip install 'moecompile[distributed]'")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"moecompile {__version__}")
    return p


def build_verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moecompile verify",
        description="Check that a GGUF or ONNX file — also one moecompile did not write — "
                    "computes what a checkpoint computes, within what its weight types allow: "
                    "exit 0 if it does, 1 if it does not (saying where), 2 on bad input.")
    p.add_argument("file", help="the .gguf or .onnx file")
    p.add_argument("--against", required=True, metavar="MODEL",
                   help="the Hugging Face checkpoint folder the file was made from")
    p.add_argument("--device", default=None, help="torch device of the reference executor")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    from .job import run, verify_file
    from .options import Options

    argv = sys.argv[1:] if argv is None else list(argv)
    verifying = bool(argv) and argv[0] == "verify"
    args = (build_verify_parser().parse_args(argv[1:]) if verifying
            else build_parser().parse_args(argv))
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO,
                        format="moecompile: %(message)s", stream=sys.stderr, force=True)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its INFO lines name our temp file
    say = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    try:
        if verifying:
            return 0 if verify_file(args.file, args.against, args.device, say).passed else 1
        return run(Options.from_namespace(args), say).exit_code
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
        print("moecompile: interrupted; nothing was written (a long layer-major pass keeps its "
              "progress: the same command resumes it)", file=sys.stderr)
        return 130
    except OSError as exc:  # a path the user gave cannot be read or written
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"moecompile: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except InternalError as exc:
        if args.debug:
            raise
        print(f"moecompile: internal error: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        return 3
    except Exception as exc:  # a bug: say so in one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"moecompile: internal error: {type(exc).__name__}: {exc} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
