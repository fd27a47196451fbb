"""Benchmark fewer active experts and dropped blocks: llama.cpp speed next to accuracy.

    python tools/bench_trim.py [--repeat 3] [--olmoe-layers 3] [--n 50]

Two models: the bundled `models/moe-tiny` (trained; accuracy on its tasks) and a random-weight
checkpoint with OLMoE-1B-7B's shapes cut to a few layers (64 experts, top-8; speed only, cached
in .bench/ as for bench_convert.py). Each variant is compiled by moecompile to Q8_0 GGUF:
top-k = original, original/2 and 1 (plain; for the bundled model also searched), and 0/1/2
dropped blocks. All variants of a model are timed side by side in one run, interleaved, each
in a fresh llama.cpp context (2 threads, F16 KV cache as a user would run it): prompt
tokens/s over a 128-token prompt and decode tokens/s over 64 greedy tokens, median of
`--repeat` runs. Ratios are against the unmodified compile of the same model.
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

from moecompile.evaluation import evaluate
from moecompile.tasks import TASKS
from moecompile.testing.checkpoints import ensure_model
from moecompile.testing.timing import DECODE_TOKENS, LLAMA_TIMER, PROMPT_TOKENS

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2

def compile_variant(model: Path, out: Path, extra: list[str], verify: bool) -> None:
    cmd = [sys.executable, "-m", "moecompile.cli", str(model), "-o", str(out), "--dtype", "q8_0",
           "--quiet", *extra] + ([] if verify else ["--no-verify"])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def time_once(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", LLAMA_TIMER, str(path), str(PROMPT_TOKENS),
                          str(DECODE_TOKENS), str(THREADS)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def variants(top_k: int, calib: str, searched: bool) -> list[tuple[str, list[str]]]:
    out = [(f"k={top_k} (original)", [])]
    for k in sorted({top_k // 2, 1} - {top_k, 0}, reverse=True):
        out.append((f"k={k} plain", ["--top-k", str(k), "--topk-method", "plain"]))
        if searched:
            out.append((f"k={k} searched", ["--top-k", str(k), "--calib", calib,
                                             "--calib-n", "16"]))
    for m in (1, 2):
        out.append((f"drop {m} block{'s' if m > 1 else ''}", ["--drop-blocks", str(m),
                                                              "--calib", calib, "--calib-n", "16"]))
    return out


def bench_model(name: str, model: Path, top_k: int, work: Path, repeat: int, n: int | None,
                verify: bool) -> list[dict]:
    rows = []
    files = []
    for label, extra in variants(top_k, "all", searched=n is not None):
        out = work / f"{name}-{len(files)}.gguf"
        t0 = time.monotonic()
        print(f"[{name}] compiling {label} ...", flush=True)
        compile_variant(model, out, extra, verify)
        files.append((label, out, time.monotonic() - t0))
    timings: dict[str, list[dict]] = {label: [] for label, _, _ in files}
    for r in range(repeat):  # interleaved: every variant once per round
        for label, out, _ in files:
            timings[label].append(time_once(out))
    for label, out, secs in files:
        row = {"model": name, "variant": label, "compile_s": secs,
               "prompt_tps": statistics.median(t["prompt_tps"] for t in timings[label]),
               "decode_tps": statistics.median(t["decode_tps"] for t in timings[label]),
               "bytes": out.stat().st_size}
        if n is not None:
            res = evaluate(str(out), tasks=list(TASKS), n=n, progress=False)["tasks"]
            row["accuracy"] = {t: r["accuracy"] for t, r in res.items()}
        rows.append(row)
        print(format_row(row, rows[0]), flush=True)
        out.unlink()
    return rows


def format_row(row: dict, base: dict) -> str:
    acc = ""
    if "accuracy" in row:
        acc = " | " + " ".join(f"{t} {a:.2f}" for t, a in row["accuracy"].items())
    return (f"{row['model']:>12} {row['variant']:<18} prompt {row['prompt_tps']:8.1f} t/s "
            f"({row['prompt_tps'] / base['prompt_tps']:.2f}x)  decode {row['decode_tps']:7.1f} t/s "
            f"({row['decode_tps'] / base['decode_tps']:.2f}x){acc}")


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | prompt t/s | × | decode t/s | × | mean accuracy | "
             + " | ".join(TASKS) + " |", "|---" * (7 + len(TASKS)) + "|"]
    base = {}
    for r in rows:
        b = base.setdefault(r["model"], r)
        acc = r.get("accuracy")
        mean = f"{sum(acc.values()) / len(acc):.3f}" if acc else "–"
        cells = [f"{acc[t]:.2f}" for t in TASKS] if acc else ["–"] * len(TASKS)
        lines.append(f"| {r['model']} | {r['variant']} | {r['prompt_tps']:.1f} | "
                     f"{r['prompt_tps'] / b['prompt_tps']:.2f} | {r['decode_tps']:.1f} | "
                     f"{r['decode_tps'] / b['decode_tps']:.2f} | {mean} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--olmoe-layers", type=int, default=3)
    p.add_argument("--n", type=int, default=50, help="test examples per task (bundled model)")
    p.add_argument("--work", type=Path, default=ROOT / ".bench")
    args = p.parse_args()
    args.work.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        rows += bench_model("moe-tiny", ROOT / "models" / "moe-tiny", 2, Path(tmp), args.repeat,
                            args.n, verify=True)
        olmoe = ensure_model(args.work, args.olmoe_layers)
        rows += bench_model(f"olmoe-{args.olmoe_layers}l", olmoe, 8, Path(tmp), args.repeat,
                            None, verify=False)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
