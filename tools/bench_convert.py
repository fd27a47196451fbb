"""Benchmark `moecompile --target gguf` against llama.cpp's own `convert_hf_to_gguf.py`.

    python tools/bench_convert.py [--model DIR] [--work .bench] [--layers 2] [--repeat 3]
                                  [--json OUT.json]

Both tools convert the same random-weight checkpoint with OLMoE-1B-7B's shapes (hidden 2048,
64 experts of FFN 1024, top-8, vocab 50304) cut to `--layers` layers, to BF16 and to Q8_0. For
each run the wall time and the child's peak RSS are recorded; the median of `--repeat` runs is
reported as a Markdown table on stdout, with the ratios and whether the issue's targets are met
(moecompile's peak RSS at most half the reference's, its wall time no worse). Progress goes to
stderr.

Fairness:

* moecompile runs with `--no-verify --quiet`, because llama.cpp's converter does not verify its
  output either; verification (loading the file in llama.cpp) is a separate cost.
* Runs are interleaved (moecompile, reference, moecompile, ...) so drift in page cache, disk or
  CPU clock affects both tools alike, and `os.sync()` runs before each one so the previous run's
  2 GB of dirty output is not written back during the next run's timing.
* Each output is checked afterwards (exists, loads with `gguf.GGUFReader`, tensor count) and its
  size is printed, so a tool cannot look fast by writing less.

The reference converter comes from the sdist of the installed llama-cpp-python (the same llama.cpp
revision moecompile's verification runs): `pip download --no-binary :all:` into `WORK/sdist`, and
only `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/` are extracted into
`WORK/llama.cpp-convert/`. It runs with `PYTHONPATH=WORK/llama.cpp-convert/gguf-py`, i.e. with its
own gguf-py. It is a reference only; none of its code belongs in this repository.

The converter refuses BPE tokenizers whose pre-tokenizer hash it does not know, and the benchmark
tokenizer is trained locally. So it is started through a small wrapper, `run_convert.py`, written
into `WORK/llama.cpp-convert/` at run time: it patches `TextModel.get_vocab_base_pre` to return
"gpt-2" (the tokenizer is byte-level BPE with the GPT-2 regex, so that is also the right answer)
and then calls the converter's `main()` with the same argv a user would type.

Measuring: each conversion is a child process started with `subprocess.Popen` and reaped with
`os.wait4`, whose rusage is that child's alone (`ru_maxrss`, KiB on Linux). Linux folds the
parent's high-water RSS into a child's `ru_maxrss` at exec time, so this script keeps its own
process small: it never imports torch, numpy or gguf, and builds the checkpoint and reads the
outputs in child processes.

Everything is cached under `--work` (default `.bench/` at the repository root): the checkpoint,
the sdist, the extracted converter, the outputs of the last run and one log per run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moecompile.testing.checkpoints import ensure_model, log
from moecompile.testing.converter import ensure_reference

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("bf16", "q8_0")
TOOLS = ("moecompile", "convert_hf_to_gguf")
RSS_TARGET = 0.5   # moecompile peak RSS / reference peak RSS must be at most this
TIME_TARGET = 1.0  # moecompile wall time / reference wall time must be at most this
GIB = 2 ** 30


# ------------------------------------------------------------------------------ inputs


# ------------------------------------------------------------------------------ measuring


@dataclass
class Run:
    tool: str
    target: str
    wall_s: float
    peak_rss_kib: int


def command(tool: str, target: str, model: Path, out: Path, wrapper: Path) -> tuple[list[str], dict]:
    """The command line and environment a user would use for each tool."""
    env = dict(os.environ)
    if tool == "moecompile":
        exe = Path(sys.executable).parent / "moecompile"
        prog = [str(exe)] if exe.exists() else [sys.executable, "-m", "moecompile.cli"]
        return [*prog, str(model), "--target", "gguf", "-o", str(out), "--dtype", target,
                "--no-verify", "--quiet"], env
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(wrapper.parent / "gguf-py"),
                                                      env.get("PYTHONPATH")]))
    return [sys.executable, str(wrapper), str(model), "--outfile", str(out),
            "--outtype", target], env


def measure(argv: list[str], env: dict, logfile: Path) -> tuple[float, int]:
    """Run one child to completion; its wall time and its own peak RSS (KiB).

    `os.wait4` reaps the child and returns its rusage directly, so nothing else (this process,
    other children) is mixed in. Output goes to `logfile`; a failure stops the benchmark."""
    with open(logfile, "wb") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-20:]
        sys.exit("bench: command failed (exit {}): {}\n{}".format(
            proc.returncode, " ".join(argv), "\n".join(tail)))
    return wall, usage.ru_maxrss


def output_path(outdir: Path, tool: str, target: str) -> Path:
    return outdir / f"{tool}-{target}.gguf"


def run_all(model: Path, wrapper: Path, work: Path, repeat: int) -> list[Run]:
    """Every run, tools interleaved within each repetition so drift hits both alike."""
    outdir, logs = work / "out", work / "logs"
    outdir.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    runs = []
    for target in TARGETS:
        for rep in range(1, repeat + 1):
            for tool in TOOLS:
                out = output_path(outdir, tool, target)
                out.unlink(missing_ok=True)  # every run writes a fresh file
                os.sync()  # flush the last run's output now, not during this run's timing
                argv, env = command(tool, target, model, out, wrapper)
                log(f"[{target} {rep}/{repeat}] {tool} ...")
                wall, rss = measure(argv, env, logs / f"{tool}-{target}-{rep}.log")
                if not out.exists():
                    sys.exit(f"bench: {tool} exited 0 but wrote no {out}")
                log(f"[{target} {rep}/{repeat}] {tool}: {wall:.1f} s, peak RSS {rss / 2**20:.2f} GiB")
                runs.append(Run(tool, target, wall, rss))
    return runs


_READ_SCRIPT = """
import json, sys, gguf
print(json.dumps({p: len(gguf.GGUFReader(p).tensors) for p in sys.argv[1:]}))
"""


def tensor_counts(paths: list[Path]) -> dict[str, int]:
    """Load every output with gguf.GGUFReader (in a child: numpy stays out of this process)."""
    done = subprocess.run([sys.executable, "-c", _READ_SCRIPT, *map(str, paths)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout)


# ------------------------------------------------------------------------------ reporting


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kib = next((int(line.split()[1]) for line in _read_lines("/proc/meminfo")
                    if line.startswith("MemTotal:")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_kib / 2**20, 1),
            "python": platform.python_version()}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def model_shape(model: Path) -> dict:
    cfg = json.loads((model / "config.json").read_text())
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
            "num_experts_per_tok", "intermediate_size", "vocab_size", "torch_dtype", "dtype")
    return {**{k: cfg[k] for k in keys if k in cfg}, "architectures": cfg.get("architectures"),
            "checkpoint_gib": round(size / GIB, 3)}


@dataclass
class Summary:
    target: str
    tool: str
    wall_s: float
    peak_rss_gib: float
    output_gib: float
    tensors: int
    wall_runs: list[float] = field(default_factory=list)
    rss_runs_gib: list[float] = field(default_factory=list)


def summarize(runs: list[Run], outdir: Path) -> list[Summary]:
    paths = [output_path(outdir, tool, target) for target in TARGETS for tool in TOOLS]
    counts = tensor_counts(paths)
    out = []
    for target in TARGETS:
        for tool in TOOLS:
            mine = [r for r in runs if r.tool == tool and r.target == target]
            path = output_path(outdir, tool, target)
            out.append(Summary(
                target, tool,
                wall_s=statistics.median(r.wall_s for r in mine),
                peak_rss_gib=statistics.median(r.peak_rss_kib for r in mine) / 2**20,
                output_gib=path.stat().st_size / GIB,
                tensors=counts[str(path)],
                wall_runs=[r.wall_s for r in mine],
                rss_runs_gib=[r.peak_rss_kib / 2**20 for r in mine]))
    return out


def verdicts(summaries: list[Summary]) -> dict[str, dict]:
    """moecompile / reference ratios per target and whether the issue's targets are met."""
    out = {}
    for target in TARGETS:
        ours, ref = (next(s for s in summaries if s.target == target and s.tool == tool)
                     for tool in TOOLS)
        time_ratio, rss_ratio = ours.wall_s / ref.wall_s, ours.peak_rss_gib / ref.peak_rss_gib
        out[target] = {"time_ratio": time_ratio, "rss_ratio": rss_ratio,
                       "size_ratio": ours.output_gib / ref.output_gib,
                       "time_met": time_ratio <= TIME_TARGET, "rss_met": rss_ratio <= RSS_TARGET}
    return out


def render(info: dict, shape: dict, repeat: int, summaries: list[Summary], ratios: dict) -> str:
    dtype = shape.get("dtype") or shape.get("torch_dtype")
    lines = [
        f"# moecompile vs llama.cpp convert_hf_to_gguf.py — {info['date']}",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM; "
        f"Python {info['python']}; llama-cpp-python {info['llama_cpp_python']} "
        f"(converter from its sdist), moecompile {info['moecompile']}.",
        f"Model: {shape.get('architectures')} with OLMoE-1B-7B shapes, "
        f"{shape.get('num_hidden_layers')} layers, hidden {shape.get('hidden_size')}, "
        f"{shape.get('num_experts')} experts (FFN {shape.get('intermediate_size')}, "
        f"top-{shape.get('num_experts_per_tok')}), vocab {shape.get('vocab_size')}, {dtype}, "
        f"{shape['checkpoint_gib']:.2f} GiB of safetensors.",
        f"Median of {repeat} runs per cell, tools interleaved. moecompile runs with "
        "`--no-verify --quiet` because convert_hf_to_gguf.py does not verify its output either.",
        "",
        "| target | tool | wall s (median) | peak RSS GiB (median) | output GiB | tensors |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for target in TARGETS:
        for s in (s for s in summaries if s.target == target):
            lines.append(f"| {target} | {s.tool} | {s.wall_s:.1f} | {s.peak_rss_gib:.2f} | "
                         f"{s.output_gib:.3f} | {s.tensors} |")
        r = ratios[target]
        lines.append(f"| {target} | **moecompile / convert_hf_to_gguf** | **{r['time_ratio']:.2f}×** "
                     f"| **{r['rss_ratio']:.2f}×** | {r['size_ratio']:.2f}× | |")
    lines += ["", f"Targets: peak RSS ratio ≤ {RSS_TARGET}, wall-time ratio ≤ {TIME_TARGET}.", ""]
    for target in TARGETS:
        r = ratios[target]
        lines.append(f"- {target}: peak RSS {r['rss_ratio']:.2f}× — "
                     f"{'met' if r['rss_met'] else 'NOT met'}; wall time {r['time_ratio']:.2f}× — "
                     f"{'met' if r['time_met'] else 'NOT met'}")
    lines += ["", "Individual runs (wall s / peak RSS GiB):", ""]
    for s in summaries:
        runs = ", ".join(f"{w:.1f}/{m:.2f}" for w, m in zip(s.wall_runs, s.rss_runs_gib))
        lines.append(f"- {s.target} {s.tool}: {runs}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint folder to convert (default: build and "
                   "cache a random OLMoE-1B-7B-shaped one)")
    p.add_argument("--work", type=Path, default=ROOT / ".bench",
                   help="cache and scratch folder (default: .bench/ at the repository root)")
    p.add_argument("--layers", type=int, default=2, help="layers of the built model (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="runs per tool and target (default 3)")
    p.add_argument("--json", type=Path, help="also write the raw numbers to this JSON file")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.layers < 1:
        p.error("--repeat and --layers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = args.model.resolve() if args.model else ensure_model(work, args.layers)
    wrapper = ensure_reference(work)
    info = {**machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
            "moecompile": importlib.metadata.version("moecompile")}
    shape = model_shape(model)
    log(f"model {model} ({shape['checkpoint_gib']:.2f} GiB); {args.repeat} run(s) per cell")

    runs = run_all(model, wrapper, work, args.repeat)
    summaries = summarize(runs, work / "out")
    ratios = verdicts(summaries)
    print(render(info, shape, args.repeat, summaries, ratios))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "model": {"path": str(model), **shape},
                                         "repeat": args.repeat, "runs": [asdict(r) for r in runs],
                                         "summary": [asdict(s) for s in summaries],
                                         "ratios": ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
