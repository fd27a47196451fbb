"""Benchmark the recipe question: at equal bytes, which axis costs least accuracy?

    python tools/bench_slim.py [--n 500] [--calib all] [--calib-n 16] [--png docs/bench_slim.png]
                               [--json FILE] [--speed-layers 2] [--repeat 3] [--tables FILE]
                               [--allocator-only]

On the bundled model, GGUF files of the same weight size are compiled by moecompile along one
axis at a time — expert width only (`--expert-width`, every importance, with and without the
least-squares refit; F16), expert count only (`--experts`, EEP and the baseline EEP found best
on the calibration data; F16), weight types only (`--quant auto`) — and by the budget
allocator over all of them (`--budget --allow-prune`), then measured in llama.cpp against the
original model (transformers): KL of next-token distributions on the tasks' test prompts (the
calibration's domain, held out) and on held-out Python source (outside it), apart, and task
accuracy (greedy, test split, `--n` prompts per task). Every
file answers the same prompts, so two are compared prompt by prompt: the allocator's choice
against the most accurate single axis of its size, with a paired 95% confidence interval.

Sizes: the F16 file at width 0.75 and 0.5 (so width-only at those sizes is exactly that
width), and the uniform Q4_K and Q3_K files' sizes. A width sweep at 0.25 adds the third
width for "importance-based at least random". `--allocator-only`: only the types and the
allocator rows, at those sizes and the uniform Q6_K and Q5_K files' besides. Then decode
speed: a width-0.5 Q8_0 file next to the full Q8_0 one in llama.cpp (as tools/bench_trim.py times files), on the bundled model and
on a random-weight checkpoint with OLMoE-1B-7B's shapes cut to `--speed-layers` layers
(cached in .bench/). A PNG of size vs KL and size vs accuracy needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # before torch and llama.cpp load their OpenMP runtimes
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")  # as bench_quant: quality only

from moecompile import frontend  # noqa: E402
from moecompile.cli import main as compile_main  # noqa: E402
from moecompile.evaluation import open_backend  # noqa: E402
from moecompile.evaluation.paired import Z95, measure, paired_difference  # noqa: E402
from moecompile.exporters.gguf.memory import context_bytes  # noqa: E402
from moecompile.evaluation.metrics import corpus_windows, divergence  # noqa: E402
from moecompile.tasks import TASKS, corpus_texts, examples  # noqa: E402
from moecompile.testing.checkpoints import ensure_model  # noqa: E402
from moecompile.testing.timing import DECODE_TOKENS, LLAMA_TIMER, PROMPT_TOKENS  # noqa: E402
from moecompile.widths import block_friendly  # noqa: E402

CTX = 512
ROOT = Path(__file__).resolve().parents[1]
IMPORTANCES = ("wanda", "activation", "weight", "random")
REFITS = ("lsq", "none")


def compile_gguf(model: str, out: Path, *flags: str) -> dict | None:
    """Compile; the report, or None when moecompile refused or failed."""
    rc = compile_main([model, "-o", str(out), "--quiet", *flags])
    if rc != 0:
        print(f"{out.name}: compile failed ({rc})", flush=True)
        return None
    return json.loads(out.with_suffix(".report.json").read_text())


def structure_of(report: dict) -> str:
    """What a file's passes did: experts kept, width kept (from the report's history)."""
    parts = []
    for entry in report["passes"]:
        if entry["pass"] == "prune_experts":
            parts.append(f"{entry['experts']} experts ({entry['method']})")
        elif entry["pass"] == "slim_experts":
            widths = {w for layer in entry["layers"].values() for w in layer["kept"]}
            parts.append(f"width {'/'.join(map(str, sorted(widths)))}")
    return ", ".join(parts) or "full"


class Bench:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.model = args.model
        self.calib = ["--calib", args.calib, "--calib-n", str(args.calib_n)]
        self.base = open_backend(args.model)
        self.tasks = list(TASKS)
        self.rows: list[dict] = []
        self.fixed = context_bytes(frontend.load(args.model), CTX)
        self.sequences = {
            "prompts": [self.base.encode(e.prompt + e.answer) for t in self.tasks
                        for e in examples(t, "test", min(args.n, 100))],
            "text": corpus_windows(self.base, corpus_texts("test"), 256, 8192)}

    def row(self, size: str, axis: str, label: str, name: str, flags: list[str],
            budget: int | None = None) -> dict | None:
        out = self.work / f"{name}.gguf"
        report = compile_gguf(self.model, out, *flags)
        if report is None:
            row = {"size": size, "axis": axis, "config": label, "fits": False}
            self.rows.append(row)
            return None
        row = {"size": size, "axis": axis, "config": label, "weights_bytes":
               report["tensor_bytes"], "structure": structure_of(report),
               "verified": report["verification"]["passed"] if report["verification"] else None,
               **measure(out, self.base, self.tasks, self.args.n), **self.split_kl(out)}
        if budget is not None:
            row["budget_weights"] = budget
        for entry in report["passes"]:
            if entry.get("baseline_fitness"):
                row["best_baseline"] = max(entry["baseline_fitness"].items(),
                                           key=lambda kv: kv[1])[0]
        if "quant" in report and "structure" in report["quant"]:
            row["allocator"] = {k: v for k, v in report["quant"]["structure"].items()
                                if k != "options"}
        self.rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "correct"}), flush=True)
        out.unlink()
        return row

    def split_kl(self, path: Path) -> dict:
        """KL on the tasks' test prompts (the calibration's domain, held out) and on held-out
        Python source (outside it), apart: structure chosen on task prompts and types differ
        in how far off that domain their damage reaches."""
        model = open_backend(path)
        return {f"kl_{name}": divergence(model, self.base, seqs, progress=False)["kl"]
                for name, seqs in self.sequences.items()}

    def sizes(self, qtypes=("q4_k", "q3_k")) -> dict[str, int]:
        """Weight bytes of the sizes: F16 at width 0.75 and 0.5, uniform `qtypes`."""
        full = compile_gguf(self.model, self.work / "f16.gguf", "--dtype", "f16", "--no-verify")
        model = frontend.load(self.model)
        expert = model.blocks[0].ffn.experts[0]
        n_experts = sum(b.ffn.n_experts for b in model.blocks)
        per_neuron = 2 * 3 * model.hidden * n_experts  # F16 gate + up rows, down column
        self.width = expert.width
        self.per_neuron = per_neuron
        self.f16 = full["tensor_bytes"]
        out = {}
        for fraction in (0.75, 0.5):
            w = block_friendly(fraction, expert.width)
            out[f"F16 at width {fraction}"] = self.f16 - per_neuron * (expert.width - w)
        for qtype in qtypes:
            r = compile_gguf(self.model, self.work / f"{qtype}.gguf", "--quant", qtype,
                             "--no-verify")
            out[f"{qtype.upper()} size"] = r["tensor_bytes"]
        for f in self.work.glob("*.gguf"):
            f.unlink()
        return out

    def allocator_rows(self, size: str, tag: str, weights: int) -> None:
        """Types alone (`--quant auto`) and the allocator (`--allow-prune`) at `weights`."""
        budget = str(weights + self.fixed)
        self.row(size, "types", "--quant auto", f"{tag}-auto",
                 ["--quant", "auto", "--budget", budget, "--ctx", str(CTX), *self.calib], weights)
        self.row(size, "all", "--budget --allow-prune", f"{tag}-all",
                 ["--budget", budget, "--ctx", str(CTX), "--allow-prune", *self.calib], weights)

    def run(self) -> dict:
        original = {"config": "original (transformers)",
                    **measure(self.base, None, self.tasks, self.args.n)}
        print(json.dumps({k: v for k, v in original.items() if k != "correct"}), flush=True)
        only = self.args.allocator_only
        sizes = self.sizes(("q6_k", "q5_k", "q4_k", "q3_k") if only else ("q4_k", "q3_k"))
        n_experts = frontend.load(self.model).blocks[0].ffn.n_experts
        for size, weights in sizes.items():
            tag = size.replace(" ", "_")
            if only:
                self.allocator_rows(size, tag, weights)
                continue
            width = self.width - math.ceil((self.f16 - weights) / self.per_neuron)
            if width < 1:
                self.rows.append({"size": size, "axis": "width", "config": "F16, any width",
                                  "fits": False})
            for imp in IMPORTANCES:
                for refit in REFITS:
                    if width >= 1:
                        self.row(size, "width", f"width {width} ({imp}, refit {refit})",
                                 f"{tag}-w-{imp}-{refit}",
                                 ["--dtype", "f16", "--expert-width", str(width),
                                  "--width-method", imp, "--width-refit", refit, *self.calib])
            per_expert = self.per_neuron * self.width // n_experts
            experts = n_experts - math.ceil((self.f16 - weights) / per_expert)
            if experts < 1:
                self.rows.append({"size": size, "axis": "experts", "config": "F16, any expert "
                                  "count", "fits": False})
            else:
                eep = self.row(size, "experts", f"{experts} experts (eep)", f"{tag}-e-eep",
                               ["--dtype", "f16", "--experts", str(experts), *self.calib])
                best = _best_baseline(eep)
                self.row(size, "experts", f"{experts} experts ({best})", f"{tag}-e-{best}",
                         ["--dtype", "f16", "--experts", str(experts), "--prune-method", best,
                          *self.calib])
            self.allocator_rows(size, tag, weights)
        if only:
            return {"original": original, "sizes": sizes, "rows": self.rows}
        sweep = block_friendly(0.25, self.width)
        for imp in IMPORTANCES:
            for refit in REFITS:
                self.row("width sweep", "width", f"width {sweep} ({imp}, refit {refit})",
                         f"sweep-{imp}-{refit}",
                         ["--dtype", "f16", "--expert-width", str(sweep), "--width-method", imp,
                          "--width-refit", refit, *self.calib])
        return {"original": original, "sizes": sizes, "rows": self.rows}


def _best_baseline(eep_row: dict | None) -> str:
    """The baseline EEP's own report found best on the calibration data (frequency if none)."""
    return (eep_row or {}).get("best_baseline", "frequency")


def comparisons(result: dict) -> list[dict]:
    """Per size: the allocator against the most accurate single axis, and against types only."""
    out = []
    for size in result["sizes"]:
        rows = [r for r in result["rows"] if r["size"] == size and r.get("correct")]
        combined = next((r for r in rows if r["axis"] == "all"), None)
        singles = [r for r in rows if r["axis"] != "all"]
        if not combined or not singles:
            continue
        best = max(singles, key=lambda r: (r["accuracy"], -r["kl_prompts"]))
        types = next((r for r in singles if r["axis"] == "types"), None)
        for label, other in (("best single axis", best), ("types only", types)):
            if other is not None:
                out.append({"size": size, "vs": f"{label}: {other['config']}",
                            **{f"kl_{k}": combined[f"kl_{k}"] for k in ("prompts", "text")},
                            **{f"kl_{k}_other": other[f"kl_{k}"] for k in ("prompts", "text")},
                            **paired_difference(combined["correct"], other["correct"])})
    return out


def table(result: dict) -> str:
    original = result["original"]
    n = len(original["correct"])
    lines = [f"original (transformers): accuracy {original['accuracy']:.3f} over {n} prompts",
             "", "| size | axis | configuration | structure | weights MiB | KL (test prompts) | "
             "KL (held-out text) | accuracy | Δ acc vs original [95% CI, paired] |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if not r.get("correct"):
            lines.append(f"| {r['size']} | {r['axis']} | {r['config']} | – | – | – | – | "
                         "– | does not fit / refused |")
            continue
        d = paired_difference(r["correct"], original["correct"])
        lines.append(f"| {r['size']} | {r['axis']} | {r['config']} | {r['structure']} | "
                     f"{r['weights_bytes'] / 2**20:.2f} | {r['kl_prompts']:.5f} | "
                     f"{r['kl_text']:.5f} | "
                     f"{r['accuracy']:.4f} | {d['diff']:+.4f} [{d['low']:+.4f}, "
                     f"{d['high']:+.4f}] |")
    lines += ["", "| size | allocator vs | Δ accuracy | 95% CI (paired) | only allocator / "
              "only other right | KL prompts: allocator / other | KL text: allocator / other |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for c in comparisons(result):
        lines.append(f"| {c['size']} | {c['vs']} | {c['diff']:+.4f} | [{c['low']:+.4f}, "
                     f"{c['high']:+.4f}] | {c['a_only']} / {c['b_only']} | "
                     f"{c['kl_prompts']:.5f} / {c['kl_prompts_other']:.5f} | "
                     f"{c['kl_text']:.5f} / {c['kl_text_other']:.5f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- speed


def time_once(path: Path, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_THREAD_LIMIT"}  # speed: threads
    out = subprocess.run([sys.executable, "-c", LLAMA_TIMER, str(path), str(PROMPT_TOKENS),
                          str(DECODE_TOKENS), str(threads)], check=True, capture_output=True,
                         text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed(args, work: Path) -> list[dict]:
    """Q8_0 full vs width 0.5 (Q8_0), timed side by side, interleaved, median of --repeat."""
    models = [("moe-tiny", args.model, ["--calib", args.calib, "--calib-n", str(args.calib_n)],
               True)]
    if args.speed_layers:
        olmoe = ensure_model(ROOT / ".bench", args.speed_layers)
        # random weights: no accuracy to keep, so the cheapest importance and no calibration
        models.append((f"olmoe-{args.speed_layers}l", str(olmoe),
                       ["--width-method", "weight", "--width-refit", "none"], False))
    rows = []
    for name, model, flags, verify in models:
        files = []
        for label, extra in (("Q8_0", []), ("Q8_0, width 0.5", ["--expert-width", "0.5",
                                                                *flags])):
            out = work / f"speed-{name}-{len(files)}.gguf"
            extra = extra + ([] if verify else ["--no-verify"])
            report = compile_gguf(model, out, "--dtype", "q8_0", *extra)
            files.append((label, out, report["tensor_bytes"]))
        timings = {label: [] for label, _, _ in files}
        for _ in range(args.repeat):
            for label, out, _ in files:
                timings[label].append(time_once(out, args.threads))
        for label, out, nbytes in files:
            rows.append({"model": name, "variant": label, "bytes": nbytes,
                         "prompt_tps": statistics.median(t["prompt_tps"] for t in timings[label]),
                         "decode_tps": statistics.median(t["decode_tps"] for t in timings[label])})
            print(json.dumps(rows[-1]), flush=True)
            out.unlink()
    return rows


def speed_table(rows: list[dict]) -> str:
    lines = ["| model | variant | weights MiB | prompt t/s | × | decode t/s | × |",
             "|---|---|---:|---:|---:|---:|---:|"]
    base = {}
    for r in rows:
        b = base.setdefault(r["model"], r)
        lines.append(f"| {r['model']} | {r['variant']} | {r['bytes'] / 2**20:.1f} | "
                     f"{r['prompt_tps']:.1f} | {r['prompt_tps'] / b['prompt_tps']:.2f} | "
                     f"{r['decode_tps']:.1f} | {r['decode_tps'] / b['decode_tps']:.2f} |")
    return "\n".join(lines)


def plot(result: dict, png: Path) -> None:
    """Size vs KL (log) and size vs accuracy (95% binomial error bars), one series per axis."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("the plot needs matplotlib: pip install -e '.[bench]'; the tables are complete")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kl_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [("width (wanda, refit lsq)", lambda r: r["axis"] == "width"
               and r["config"].endswith("(wanda, refit lsq)") and r["size"] != "width sweep", "o"),
              ("width (random, no refit)", lambda r: r["axis"] == "width"
               and r["config"].endswith("(random, refit none)")
               and r["size"] != "width sweep", "x"),
              ("experts (eep)", lambda r: r["axis"] == "experts" and "(eep)" in r["config"], "s"),
              ("types (--quant auto)", lambda r: r["axis"] == "types", "^"),
              ("all (--allow-prune)", lambda r: r["axis"] == "all", "*")]
    for label, pick, marker in series:
        pts = sorted((r for r in result["rows"] if r.get("correct") and pick(r)),
                     key=lambda r: r["weights_bytes"])
        if not pts:
            continue
        x = [r["weights_bytes"] / 2**20 for r in pts]
        err = [Z95 * math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / len(r["correct"]))
               for r in pts]
        kl_ax.plot(x, [max(r["kl_prompts"], 1e-6) for r in pts], marker=marker, label=label)
        acc_ax.errorbar(x, [r["accuracy"] for r in pts], yerr=err, marker=marker, capsize=3,
                        label=label)
    acc_ax.axhline(result["original"]["accuracy"], color="grey", linestyle="--",
                   label="original (transformers)")
    kl_ax.set(xlabel="weights (MiB)", ylabel="mean KL vs original on test prompts",
              yscale="log", title="size vs KL (lower is better)")
    acc_ax.set(xlabel="weights (MiB)", ylabel="mean task accuracy",
               title=f"size vs accuracy ({len(result['original']['correct'])} prompts, 95% CI)")
    for ax in (kl_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "moe-tiny"))
    p.add_argument("--n", type=int, default=500, help="test prompts per task")
    p.add_argument("--calib", default="all")
    p.add_argument("--calib-n", type=int, default=16)
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "bench_slim.png")
    p.add_argument("--json", type=Path, help="also write every row, prompt outcomes included")
    p.add_argument("--speed-layers", type=int, default=2,
                   help="layers of the OLMoE-shaped speed model (0: bundled model only)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-quality", action="store_true", help="only the speed table")
    p.add_argument("--allocator-only", action="store_true",
                   help="only types and the allocator, at two more sizes (Q6_K's, Q5_K's); "
                        "no speed table")
    p.add_argument("--tables", type=Path, metavar="FILE.json",
                   help="print the tables and the plot of a saved --json run; measure nothing")
    args = p.parse_args()
    if args.tables:
        saved = json.loads(args.tables.read_text())
        print(table(saved))
        plot(saved, args.png)
        print()
        print(speed_table(saved.get("speed", [])))
        return
    work = ROOT / ".bench"
    work.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        result = None if args.skip_quality else Bench(args, Path(tmp)).run()
        if args.json and result:
            args.json.write_text(json.dumps(result))
        speeds = [] if args.allocator_only else speed(args, Path(tmp))
    if result:
        print()
        print(table(result))
        if not args.allocator_only:  # the README's plot shows every axis
            plot(result, args.png)
    print()
    print(speed_table(speeds))
    if args.json:
        data = json.loads(args.json.read_text()) if args.json.exists() else {}
        args.json.write_text(json.dumps({**data, "speed": speeds}))


if __name__ == "__main__":
    main()
