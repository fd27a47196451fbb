"""Benchmark moecompile on real-shape checkpoints: wall time and peak memory at two depths.

    python tools/bench_scale.py [--work .bench/scale] [--depths 4,16] [--only default,quant,...]
                                [--json OUT.json]

Random-weight checkpoints with OLMoE-1B-7B's exact shapes (hidden 2048, 64 experts of FFN 1024,
top-8, vocab 50304; bf16) are written by streaming (moecompile.testing.synthetic: never holding
the model) at each depth, and each command runs in a fresh process:

- default: `moecompile MODEL -o OUT/` (lossless bf16, verified in llama.cpp);
- quant: `--quant q4_k` (verified);
- budget: `--budget` set to 60% of the lossless file's memory (types chosen by the layer-local
  sensitivity; verified); budget-5gb: `--budget 5GB` (the issue's target at 16 layers), both
  printing their ETA first (the log keeps it; compare with the wall time);
- frequency / reap / reconstruct: `--experts 32 --prune-method frequency|reap|reconstruct
  --no-verify` (reconstruct: NAEE's layer-local search over sampled subsets);
- eep: `--experts 32 --search-budget 10 --no-verify` (a generation of candidates per
  layer-major pass; the default 400 evaluations are refused at this size with their measured
  ETA, also recorded as eep-default); topk: `--top-k 4 --search-budget 5` (EEP's merging
  phase, the same way), topk-default: its default length, refused with the measured ETA.
  tools/bench_population.py compares a generation per pass with a pass per candidate.

Memory is measured twice per run: moecompile's own process (RUSAGE_SELF at its exit) and the
largest child it started (llama.cpp's verification process, which maps the whole file: what
the runtime needs to run it). The table prints both, the per-layer cost between the two depths,
and an extrapolation to the full 16-layer OLMoE, Qwen3-30B-A3B (48 layers) and Mixtral-8x7B
(32 layers) by bytes per layer. A calibration pass (the importance matrix's streaming pass) is
timed against max(the time to read the weights once, its matmul FLOPs at this machine's
measured GEMM rate). llama.cpp's own converter is measured by tools/bench_convert.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
FAMILY = "olmoe-1b-7b"
# bf16 bytes of one decoder layer, and the layers of the full models (synthetic.FAMILIES)
LAYER_BYTES = {"olmoe-1b-7b": (0.84e9, 16), "qwen3-30b-a3b": (1.25e9, 48),
               "mixtral-8x7b": (2.9e9, 32)}

_RUN = """
import resource, sys, time
from moecompile.cli import main
t = time.perf_counter()
rc = main(sys.argv[1:])
wall = time.perf_counter() - t
self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"BENCH {rc} {wall:.1f} {self_kib} {child_kib}", file=sys.stderr)
"""

_PASS = """
import json, resource, sys, time, torch
from moecompile import frontend
from moecompile.analysis.calibration import build_calib
from moecompile.analysis.imatrix import collect_streaming
from moecompile.exporters.gguf.eta import pass_values
model = frontend.load(sys.argv[1])
calib = build_calib(model, "default", int(sys.argv[2]))
paths = {p for p, t in model.tensors() if len(t.shape) == 2}
a = torch.randn(2048, 2048); b = torch.randn(2048, 2048)
t = time.perf_counter(); n = 0
while time.perf_counter() - t < 3:
    a @ b; n += 1
gemm = 2 * 2048**3 * n / (time.perf_counter() - t)
t = time.perf_counter()
for f in sorted(frontend.open_checkpoint(sys.argv[1]).path.glob("*.safetensors")):
    with open(f, "rb") as fh:
        while fh.read(1 << 26):
            pass
read = time.perf_counter() - t
t = time.perf_counter()
collect_streaming(model, calib, paths)
wall = time.perf_counter() - t
# the matmuls the pass computes: the head's input is observed, its logits are never needed
flops = 2 * pass_values(model) * calib.n_tokens
print(json.dumps({"tokens": calib.n_tokens, "gemm_gflops": gemm / 1e9, "read_s": read,
                  "matmul_s": flops / gemm, "pass_s": wall,
                  "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def checkpoint(work: Path, layers: int) -> Path:
    folder = work / f"{FAMILY}-{layers}l"
    if not (folder / "config.json").exists():
        log(f"writing a {layers}-layer {FAMILY} checkpoint into {folder}")
        subprocess.run([sys.executable, "-m", "moecompile.testing.synthetic", FAMILY, str(folder),
                        "--layers", str(layers)], check=True, stdout=subprocess.DEVNULL)
    return folder


def commands(lossless_bytes: int) -> dict[str, list[str]]:
    return {
        "default": [],
        "quant": ["--quant", "q4_k"],
        "budget": ["--budget", str(int(0.6 * lossless_bytes))],
        "frequency": ["--experts", "32", "--prune-method", "frequency", "--no-verify"],
        "reap": ["--experts", "32", "--prune-method", "reap", "--no-verify"],
        "reconstruct": ["--experts", "32", "--prune-method", "reconstruct", "--no-verify"],
        "eep": ["--experts", "32", "--search-budget", "10", "--no-verify"],
        "eep-default": ["--experts", "32", "--no-verify"],
        "budget-5gb": ["--budget", "5GB"],
        "topk": ["--top-k", "4", "--search-budget", "5", "--no-verify"],
        "topk-default": ["--top-k", "4", "--no-verify"],
    }


def run(model: Path, out: Path, flags: list[str], logfile: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    os.sync()
    with open(logfile, "w") as f:
        proc = subprocess.run([sys.executable, "-c", _RUN, str(model), "-o", f"{out}/", *flags],
                              stdout=f, stderr=subprocess.PIPE, text=True)
    f = open(logfile, "a")
    f.write(proc.stderr)
    f.close()
    last = [line for line in proc.stderr.splitlines() if line.startswith("BENCH ")]
    rc, wall, self_kib, child_kib = last[-1].split()[1:] if last else (proc.returncode, 0, 0, 0)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moecompile: error")]
    return {"rc": int(rc), "wall_s": float(wall), "self_gib": int(self_kib) / 2**20,
            "child_gib": int(child_kib) / 2**20, "error": errors[-1] if errors else None}


def lossless_memory(model: Path) -> int:
    proc = subprocess.run([sys.executable, "-m", "moecompile.cli", str(model), "--plan",
                           "--budget", "1TB"], capture_output=True, text=True, check=True)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("memory:"))
    value, unit = line.split(" = ")[1].split()[:2]
    return int(float(value) * {"GiB": GIB, "MiB": 2**20}[unit])


def table(rows: list[dict], depths: list[int]) -> str:
    lines = ["| command | depth | exit | wall s | moecompile peak GiB | llama.cpp child GiB | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = (r["error"] or "").replace("moecompile: error: ", "")[:90]
        lines.append(f"| {r['command']} | {r['depth']} | {r['rc']} | {r['wall_s']:.0f} | "
                     f"{r['self_gib']:.2f} | {r['child_gib']:.2f} | {note} |")
    lo, hi = min(depths), max(depths)
    if lo == hi:  # one depth: no per-layer cost
        return "\n".join(lines)
    lines += ["", "| command | per layer s | per layer GiB (moecompile) | peak at "
              f"{hi} / at {lo} layers | extrapolated s: OLMoE 16 / Qwen3-30B 48 / Mixtral 32 |",
              "|---|---:|---:|---:|---|"]
    by = {(r["command"], r["depth"]): r for r in rows}
    for command in dict.fromkeys(r["command"] for r in rows):
        a, b = by.get((command, lo)), by.get((command, hi))
        if not a or not b or a["rc"] != 0 or b["rc"] != 0:
            continue
        per_layer = (b["wall_s"] - a["wall_s"]) / (hi - lo)
        fixed = a["wall_s"] - per_layer * lo
        est = [fixed + per_layer * layers * size / LAYER_BYTES[FAMILY][0]
               for size, layers in LAYER_BYTES.values()]
        lines.append(f"| {command} | {per_layer:.1f} | "
                     f"{(b['self_gib'] - a['self_gib']) / (hi - lo):.3f} | "
                     f"{b['self_gib'] / max(a['self_gib'], 1e-9):.2f} | "
                     + " / ".join(f"{e:.0f}" for e in est) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / ".bench" / "scale")
    p.add_argument("--depths", default="4,16")
    p.add_argument("--only", help="comma-separated command names")
    p.add_argument("--calib-n", type=int, default=32, help="chunks of the calibration pass")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    rows, passes = [], {}
    for depth in depths:
        model = checkpoint(args.work, depth)
        todo = commands(lossless_memory(model))
        for name, flags in todo.items():
            if args.only and name not in args.only.split(","):
                continue
            log(f"{name} at {depth} layers: moecompile {' '.join(flags)}")
            r = run(model, args.work / "out", flags, args.work / f"{name}-{depth}.log")
            rows.append({"command": name, "depth": depth, **r})
            log(json.dumps(rows[-1]))
        proc = subprocess.run([sys.executable, "-c", _PASS, str(model), str(args.calib_n)],
                              capture_output=True, text=True, check=True)
        passes[depth] = json.loads(proc.stdout.splitlines()[-1])
        log(f"calibration pass at {depth} layers: {passes[depth]}")
    print(table(rows, depths))
    print()
    print("| depth | tokens | GEMM GFLOP/s | read once s | matmul s | pass s | pass / max | peak GiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for depth, r in passes.items():
        floor = max(r["read_s"], r["matmul_s"])
        print(f"| {depth} | {r['tokens']} | {r['gemm_gflops']:.0f} | {r['read_s']:.1f} | "
              f"{r['matmul_s']:.1f} | {r['pass_s']:.1f} | {r['pass_s'] / floor:.2f} | "
              f"{r['peak_gib']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "passes": passes}, indent=2))


if __name__ == "__main__":
    main()
