"""Benchmark mixed precision: size vs quality for uniform types and `--quant auto`.

    python tools/bench_quant.py [--n 1000] [--calib all] [--png docs/bench_quant.png]

On the bundled model: each uniform type (Q8_0, Q6_K, Q4_K, Q3_K, Q2_K; without and with the
importance matrix of the calibration data) and `--quant auto` (always with it) at the same
weight size (its --budget set to that size plus everything else the memory model predicts for
--ctx 512) are compiled by moecompile and measured in llama.cpp against the original model:
weight bytes, mean KL of next-token distributions and top-1 agreement (on held-out text and test
prompts), and task accuracy (greedy, test split, `--n` prompts per task). Every configuration
answers the same prompts, so auto and a uniform type are compared prompt by prompt: the
accuracy difference with a paired 95% confidence interval. Writes a PNG of size vs KL and size
vs accuracy (needs matplotlib: pip install -e '.[bench]').

Why 1000 prompts per task (add has only 509): two quantized models that both stay close to the
original differ on a few dozen prompts, so at 500 per task the sign of their accuracy
difference still changed from one set of prompts to another (see the README).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # before torch and llama.cpp load their OpenMP runtimes
    # Quality only, so one OpenMP thread per process: the results do not depend on it, and on
    # shared cores llama.cpp's and torch's spinning worker threads slowed evaluation ~20x.
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")

from moecompile import frontend  # noqa: E402
from moecompile.cli import main as compile_main  # noqa: E402
from moecompile.evaluation import open_backend  # noqa: E402
from moecompile.evaluation.paired import Z95, measure, paired_difference  # noqa: E402
from moecompile.exporters.gguf.memory import context_bytes  # noqa: E402
from moecompile.tasks import TASKS  # noqa: E402

UNIFORM = ("q8_0", "q6_k", "q4_k", "q3_k", "q2_k")
CTX = 512
ROOT = Path(__file__).resolve().parents[1]


def compile_gguf(model: str, out: Path, *flags: str) -> bool:
    rc = compile_main([model, "-o", str(out), "--quiet", *flags])
    if rc != 0:
        print(f"{out.name}: compile failed ({rc})")
    return rc == 0


def weights_bytes(path: Path) -> int:
    return json.loads(path.with_suffix(".report.json").read_text())["tensor_bytes"]


def run(args) -> tuple[list[dict], dict]:
    """Every configuration's row, and the original model's accuracy row."""
    fixed = context_bytes(frontend.load(args.model), CTX)
    calib = ["--calib", args.calib, "--calib-n", str(args.calib_n)]
    base = open_backend(args.model)
    tasks = list(TASKS)
    original = {"config": "original (transformers)", **measure(base, None, tasks, args.n)}
    print(json.dumps({k: v for k, v in original.items() if k != "correct"}), flush=True)
    rows: list[dict] = []

    def config(kind: str, label: str, qtype: str, path: Path, flags: list[str]) -> dict | None:
        if not compile_gguf(args.model, path, *flags):
            return None
        row = {"config": label, "kind": kind, "type": qtype, "weights_bytes": weights_bytes(path),
               **measure(path, base, tasks, args.n)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "correct"}), flush=True)
        return row

    with tempfile.TemporaryDirectory() as tmp:
        for qtype in UNIFORM:
            out = Path(tmp)
            uniform = config("uniform", qtype, qtype, out / f"{qtype}.gguf", ["--quant", qtype])
            config("uniform + imatrix", f"{qtype} + imatrix", qtype, out / f"{qtype}-imat.gguf",
                   ["--quant", qtype, *calib])
            if uniform is not None:  # auto with the uniform type's weight bytes, same context
                budget = uniform["weights_bytes"] + fixed
                config("auto", f"auto @ {qtype} size", qtype, out / f"auto-{qtype}.gguf",
                       ["--quant", "auto", "--budget", str(budget), "--ctx", str(CTX), *calib])
    return rows, original


def pairs(rows: list[dict]) -> list[dict]:
    """auto @ X size against uniform X, with and without the importance matrix."""
    by = {(r["kind"], r["type"]): r for r in rows}
    out = []
    for qtype in UNIFORM:
        auto = by.get(("auto", qtype))
        for kind in ("uniform", "uniform + imatrix"):
            other = by.get((kind, qtype))
            if auto and other:
                out.append({"auto": auto["config"], "vs": other["config"],
                            **paired_difference(auto["correct"], other["correct"])})
    return out


def print_tables(rows: list[dict], original: dict, compared: list[dict]) -> None:
    n = len(original["correct"])
    print(f"\noriginal (transformers): accuracy {original['accuracy']:.3f} over {n} prompts\n")
    print("| configuration | weights MiB | KL vs original | top-1 agreement | accuracy |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['weights_bytes'] / 2**20:.2f} | {r['kl']:.5f} | "
              f"{r['top1']:.3f} | {r['accuracy']:.3f} |")
    tasks = list(original["tasks"])
    print("\nAccuracy per task (the same prompts for every configuration):\n")
    print("| configuration | " + " | ".join(tasks) + " |")
    print("|---|" + "---:|" * len(tasks))
    for r in [original, *rows]:
        print(f"| {r['config']} | " + " | ".join(f"{r['tasks'][t]:.3f}" for t in tasks) + " |")
    print("\n| auto vs | accuracy difference | 95% CI (paired) | prompts only auto / only "
          "uniform got right |")
    print("|---|---:|---:|---:|")
    for p in compared:
        print(f"| {p['vs']} | {p['diff']:+.4f} | [{p['low']:+.4f}, {p['high']:+.4f}] | "
              f"{p['a_only']} / {p['b_only']} |")


def plot(rows: list[dict], original: dict, png: Path) -> None:
    """Size vs KL (log) and size vs accuracy (95% binomial error bars), one line per kind."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("the plot needs matplotlib: pip install -e '.[bench]' (or pip install "
                 "matplotlib); the tables above are complete without it")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kl_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, marker in (("uniform", "o"), ("uniform + imatrix", "s"), ("auto", "^")):
        pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["weights_bytes"])
        x = [r["weights_bytes"] / 2**20 for r in pts]
        err = [Z95 * math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / len(r["correct"]))
               for r in pts]
        kl_ax.plot(x, [r["kl"] for r in pts], marker=marker, label=kind)
        acc_ax.errorbar(x, [r["accuracy"] for r in pts], yerr=err, marker=marker, capsize=3,
                        label=kind)
        if kind == "uniform":
            for r, xi in zip(pts, x):
                kl_ax.annotate(r["type"].upper(), (xi, r["kl"]), textcoords="offset points",
                               xytext=(4, 4), fontsize=8)
    acc_ax.axhline(original["accuracy"], color="grey", linestyle="--",
                   label="original (transformers)")
    kl_ax.set(xlabel="weights (MiB)", ylabel="mean KL vs original", yscale="log",
              title="size vs KL (lower is better)")
    acc_ax.set(xlabel="weights (MiB)", ylabel="mean task accuracy",
               title=f"size vs accuracy ({len(original['correct'])} prompts, 95% CI)")
    for ax in (kl_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")


def compare_sensitivity(args) -> None:
    """--compare-sensitivity: at each size where auto has a choice, --quant auto with the full
    sensitivity (one whole-model forward per group and type) against the layer-local one
    (what a model too large to run whole gets): KL and accuracy, paired."""
    fixed = context_bytes(frontend.load(args.model), CTX)
    calib = ["--calib", args.calib, "--calib-n", str(args.calib_n)]
    base = open_backend(args.model)
    tasks = list(TASKS)
    print("| auto at the size of | KL full | KL local | accuracy full | accuracy local | local - "
          "full [95% CI] | only local / only full |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in ("q6_k", "q4_k", "q3_k"):
            uniform = Path(tmp) / f"{qtype}.gguf"
            compile_gguf(args.model, uniform, "--quant", qtype)
            budget = weights_bytes(uniform) + fixed
            got = {}
            for method in ("full", "local"):
                path = Path(tmp) / f"auto-{qtype}-{method}.gguf"
                compile_gguf(args.model, path, "--quant", "auto", "--budget", str(budget),
                             "--ctx", str(CTX), "--sensitivity", method, *calib)
                got[method] = measure(path, base, tasks, args.n)
            pair = paired_difference(got["local"]["correct"], got["full"]["correct"])
            print(f"| {qtype} | {got['full']['kl']:.5f} | {got['local']['kl']:.5f} | "
                  f"{got['full']['accuracy']:.3f} | {got['local']['accuracy']:.3f} | "
                  f"{pair['diff'] * 100:+.2f} [{pair['low'] * 100:+.2f}, "
                  f"{pair['high'] * 100:+.2f}] | {pair['a_only']} / {pair['b_only']} |",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "moe-tiny"))
    p.add_argument("--n", type=int, default=1000,
                   help="test prompts per task (all of a task's test split where it has fewer)")
    p.add_argument("--calib", default="all")
    p.add_argument("--calib-n", type=int, default=16)
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "bench_quant.png")
    p.add_argument("--json", type=Path, help="also write every row, prompt outcomes included")
    p.add_argument("--compare-sensitivity", action="store_true",
                   help="only compare --quant auto's full and layer-local sensitivity")
    args = p.parse_args()
    if args.compare_sensitivity:
        compare_sensitivity(args)
        return
    rows, original = run(args)
    if args.json:
        args.json.write_text(json.dumps({"original": original, "rows": rows}))
    print_tables(rows, original, pairs(rows))
    plot(rows, original, args.png)


if __name__ == "__main__":
    main()
