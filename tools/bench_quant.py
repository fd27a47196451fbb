"""Benchmark mixed precision: size vs quality for uniform types and `--quant auto`.

    python tools/bench_quant.py [--n 50] [--calib all]

On the bundled model: each uniform type (Q8_0, Q6_K, Q4_K, Q3_K, Q2_K; without and with the
importance matrix of the calibration data) and `--quant auto` (always with it) at the same
weight size (its --budget set to that size
plus the KV cache and compute buffer for --ctx 512) are compiled by moecompile and measured in
llama.cpp against the original model: weight bytes, mean KL of next-token distributions and
top-1 agreement (on held-out text and test prompts), and task accuracy (greedy, test split).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moecompile import frontend  # noqa: E402
from moecompile.budget import compute_bytes, kv_cache_bytes  # noqa: E402
from moecompile.cli import main as compile_main  # noqa: E402
from moecompile.evaluation import evaluate  # noqa: E402
from moecompile.tasks import TASKS  # noqa: E402

UNIFORM = ("q8_0", "q6_k", "q4_k", "q3_k", "q2_k")
CTX = 512


def measure(path: Path, base: str, n: int) -> dict:
    result = evaluate(str(path), base=base, tasks=list(TASKS), n=n, progress=False)
    report = json.loads(path.with_suffix(".report.json").read_text())
    acc = [r["accuracy"] for r in result["tasks"].values()]
    return {"weights_bytes": report["tensor_bytes"], "kl": result["kl"],
            "top1": result["top1_agreement"], "accuracy": sum(acc) / len(acc)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "moe-tiny"))
    p.add_argument("--n", type=int, default=50, help="test prompts per task")
    p.add_argument("--calib", default="all")
    p.add_argument("--calib-n", type=int, default=16)
    args = p.parse_args()
    model = frontend.load(args.model)
    fixed = kv_cache_bytes(model, CTX) + compute_bytes(model, CTX)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in UNIFORM:
            for imatrix in (False, True):
                out = Path(tmp) / f"{qtype}{'-imat' if imatrix else ''}.gguf"
                extra = ["--quant", qtype]
                if imatrix:
                    extra += ["--calib", args.calib, "--calib-n", str(args.calib_n)]
                rc = compile_main([args.model, "-o", str(out), "--quiet", *extra])
                if rc != 0:
                    print(f"{qtype}: compile failed ({rc})")
                    continue
                row = {"config": qtype + (" + imatrix" if imatrix else ""),
                       **measure(out, args.model, args.n)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if not imatrix:
                    auto = Path(tmp) / f"auto-{qtype}.gguf"
                    budget = row["weights_bytes"] + fixed
                    rc = compile_main([args.model, "-o", str(auto), "--quiet", "--quant", "auto",
                                       "--budget", str(budget), "--ctx", str(CTX), "--calib",
                                       args.calib, "--calib-n", str(args.calib_n)])
                    if rc == 0:
                        row = {"config": f"auto @ {qtype} size", **measure(auto, args.model, args.n)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    print()
    print("| configuration | weights MiB | KL vs original | top-1 agreement | mean accuracy |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['weights_bytes'] / 2**20:.2f} | {r['kl']:.5f} | "
              f"{r['top1']:.3f} | {r['accuracy']:.3f} |")


if __name__ == "__main__":
    main()
