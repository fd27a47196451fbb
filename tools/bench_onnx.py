"""Benchmark the ONNX target next to llama.cpp: prompt and decode tokens/s on CPU.

    python tools/bench_onnx.py [--repeat 3] [--olmoe-layers 2] [--threads 2]

Two models: the bundled `models/moe-tiny` and a random-weight checkpoint with OLMoE-1B-7B's
shapes cut to a few layers (64 experts, top-8, hidden 2048; cached in .bench/ as for
bench_convert.py). Each is compiled by moecompile six ways: ONNX with the portable MoE lowering
and with ONNX Runtime's fused MoE/QMoE kernels, each F32 and int4 (blocks of 32), and GGUF F32
and Q4_0 (llama.cpp's own blocks of 32, the closest 4-bit format). Every file is timed in a fresh
process, all variants of a model interleaved in each round, the median of `--repeat` rounds:
prompt tokens/s over a 128-token prompt from an empty cache, decode tokens/s over 64 greedy
tokens through the KV cache. llama.cpp runs as a user would (F16 KV cache); onnxruntime with
the same number of threads. Target: the fastest ONNX form within 1.5x of llama.cpp's decode
speed (ratio = llama.cpp decode t/s / ONNX decode t/s, of the same precision).

It also measures what EEP's exact router buys on this target (GGUF can only hold a one-hot
router): the bundled model pruned to 4 of 8 experts by EEP on calibration data of every task,
once with each router, both compiled to ONNX and scored in onnxruntime (accuracy on the test
split, KL to the original).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moecompile.testing.checkpoints import ensure_model
from moecompile.testing.timing import DECODE_TOKENS, LLAMA_TIMER, PROMPT_TOKENS

ROOT = Path(__file__).resolve().parents[1]

TARGET = 1.5

ONNX_TIMER = """
import sys, time, json
import numpy as np
from moecompile.runtime.onnx_runner import OnnxDecoder
path, prompt_n, decode_n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dec = OnnxDecoder(path, "cpu", threads=threads)
rng = np.random.default_rng(0)
prompt = np.asarray([[int(t) for t in rng.integers(10, dec.vocab - 10, prompt_n)]])
dec.step(prompt[:, :8], np.ones((1, 8), np.int64), dec.empty_cache(1))  # warm-up (prepacking)
t0 = time.perf_counter()
logits, cache = dec.step(prompt, np.ones_like(prompt), dec.empty_cache(1))
t1 = time.perf_counter()
for i in range(decode_n):
    nxt = np.asarray([[int(logits[0, -1].argmax())]])
    logits, cache = dec.step(nxt, np.ones((1, prompt_n + i + 1), np.int64), cache)
t2 = time.perf_counter()
print(json.dumps({"prompt_tps": prompt_n / (t1 - t0), "decode_tps": decode_n / (t2 - t1)}))
"""

VARIANTS = [  # label, runtime, compile flags
    ("llama.cpp F32", "gguf", ["--target", "gguf", "--dtype", "f32"]),
    ("llama.cpp Q4_0", "gguf", ["--target", "gguf", "--quant", "q4_0"]),
    ("onnx portable F32", "onnx", ["--target", "onnx", "--onnx-moe", "portable"]),
    ("onnx ort F32", "onnx", ["--target", "onnx", "--onnx-moe", "ort"]),
    ("onnx portable int4", "onnx", ["--target", "onnx", "--onnx-moe", "portable", "--quant", "int4"]),
    ("onnx ort int4", "onnx", ["--target", "onnx", "--onnx-moe", "ort", "--quant", "int4"]),
]


def compile_variant(model: Path, out: Path, flags: list[str], verify: bool) -> float:
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "moecompile.cli", str(model), "-o", str(out), "--quiet", *flags]
    subprocess.run(cmd + ([] if verify else ["--no-verify"]), check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def time_once(runtime: str, path: Path, threads: int) -> dict:
    script = LLAMA_TIMER if runtime == "gguf" else ONNX_TIMER
    out = subprocess.run([sys.executable, "-c", script, str(path), str(PROMPT_TOKENS),
                          str(DECODE_TOKENS), str(threads)], check=True, capture_output=True,
                         text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_model(name: str, model: Path, work: Path, repeat: int, threads: int,
                verify: bool) -> list[dict]:
    files = []
    for label, runtime, flags in VARIANTS:
        folder = work / f"{name}-{len(files)}"
        folder.mkdir()
        out = folder / f"model.{runtime}"
        print(f"[{name}] compiling {label} ...", flush=True)
        secs = compile_variant(model, out, flags, verify)
        files.append((label, runtime, out, secs))
    timings: dict[str, list[dict]] = {label: [] for label, *_ in files}
    for r in range(repeat):  # interleaved: every variant once per round
        for label, runtime, out, _ in files:
            timings[label].append(time_once(runtime, out, threads))
            print(f"[{name}] round {r + 1}/{repeat} {label}: {timings[label][-1]}", flush=True)
    rows = []
    for label, runtime, out, secs in files:
        weights = sum(p.stat().st_size for p in out.parent.glob("model.*") if p.suffix != ".json")
        rows.append({"model": name, "variant": label, "compile_s": secs, "bytes": weights,
                     "prompt_tps": statistics.median(t["prompt_tps"] for t in timings[label]),
                     "decode_tps": statistics.median(t["decode_tps"] for t in timings[label])})
    return rows


def llama_reference(row: dict, rows: list[dict]) -> dict:
    """The llama.cpp row of the same model and precision (F32 or 4-bit)."""
    four_bit = "int4" in row["variant"] or "Q4" in row["variant"]
    return next(r for r in rows if r["model"] == row["model"] and r["variant"].startswith("llama")
                and (("Q4" in r["variant"]) == four_bit))


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | file MiB | prompt t/s | decode t/s | llama.cpp decode / this |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ref = llama_reference(r, rows)
        lines.append(f"| {r['model']} | {r['variant']} | {r['bytes'] / 2**20:.1f} | "
                     f"{r['prompt_tps']:.1f} | {r['decode_tps']:.1f} | "
                     f"{ref['decode_tps'] / r['decode_tps']:.2f}× |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        best = max((r for r in mine if r["variant"].startswith("onnx")), key=lambda r: r["decode_tps"])
        ratio = llama_reference(best, mine)["decode_tps"] / best["decode_tps"]
        fastest = max((r for r in mine if r["variant"].startswith("llama")),
                      key=lambda r: r["decode_tps"])
        out.append(f"- {model}: fastest ONNX decode is {best['variant']} at {best['decode_tps']:.1f} "
                   f"t/s; llama.cpp at the same precision {ratio:.2f}× that — target ≤ {TARGET}× "
                   f"{'met' if ratio <= TARGET else 'missed'}; llama.cpp's fastest "
                   f"({fastest['variant']}) {fastest['decode_tps'] / best['decode_tps']:.2f}×")
    return out


def router_gain(work: Path, n: int) -> list[dict]:
    """EEP to 4 experts with the one-hot and with the exact router, each compiled to ONNX."""
    from moecompile import frontend
    from moecompile.evaluation import evaluate
    from moecompile.job import compile_model
    from moecompile.passes.base import apply
    from moecompile.passes.prune_experts import PruneExperts
    from moecompile.tasks import TASKS

    bundled = ROOT / "models" / "moe-tiny"
    model = frontend.load(bundled)
    rows = []
    for mode in ("onehot", "exact"):
        pruned, report = apply(PruneExperts(4, "eep", router_mode=mode), model, "all", 32)
        out = work / f"router-{mode}" / "model.onnx"
        out.parent.mkdir()
        compiled = compile_model(pruned, out, "onnx", progress=False)
        scores = evaluate(str(out), base=str(bundled), tasks=list(TASKS), n=n, progress=False)
        accuracy = {t: r["accuracy"] for t, r in scores["tasks"].items()}
        rows.append({"router": mode, "calib_fitness": report["fitness"],
                     "mapped_layers": sum(b.ffn.router_map is not None for b in pruned.blocks),
                     "lowering": compiled.report["moe_lowering"], "accuracy": accuracy,
                     "mean_accuracy": sum(accuracy.values()) / len(accuracy), "kl": scores["kl"]})
        print(f"[router {mode}] {rows[-1]}", flush=True)
    return rows


def router_table(rows: list[dict]) -> str:
    tasks = list(rows[0]["accuracy"])
    lines = ["| EEP router | layers with a map | calibration fitness | KL vs original | mean "
             "accuracy | " + " | ".join(tasks) + " |", "|---" * (5 + len(tasks)) + "|"]
    for r in rows:
        lines.append(f"| {r['router']} | {r['mapped_layers']} | {r['calib_fitness']:.3f} | "
                     f"{r['kl']:.4f} | {r['mean_accuracy']:.3f} | "
                     + " | ".join(f"{r['accuracy'][t]:.2f}" for t in tasks) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--olmoe-layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / ".bench")
    p.add_argument("--n", type=int, default=100, help="test examples per task (router gain)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    args.work.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        routers = router_gain(Path(tmp), args.n)
        rows += bench_model("moe-tiny", ROOT / "models" / "moe-tiny", Path(tmp), args.repeat,
                            args.threads, verify=True)
        olmoe = ensure_model(args.work, args.olmoe_layers)
        rows += bench_model(f"olmoe-{args.olmoe_layers}l", olmoe, Path(tmp), args.repeat,
                            args.threads, verify=False)
    if args.json:
        args.json.write_text(json.dumps({"speed": rows, "router": routers}, indent=2))
    print()
    print(table(rows))
    print()
    print("\n".join(verdicts(rows)))
    print()
    print(router_table(routers))


if __name__ == "__main__":
    main()
