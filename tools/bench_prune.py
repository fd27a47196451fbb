"""Benchmark expert pruning: test accuracy of EEP and every baseline, side by side.

    python tools/bench_prune.py                      # the bundled model, N in {4, 2}
    python tools/bench_prune.py --experts 4 --tasks add,sort --budget 200

For each number of kept experts N and each calibration setting — one task at a time
(task-specific, as in the EEP paper) and all tasks mixed — every method prunes the model on
the task's *calib* split and is scored by greedy exact match on the *test* split (reference
executor, same numbers the GGUF export verifies against). Random is the mean of three draws.
"EEP (1-hot)" is what a GGUF can hold (router rows sliced); "EEP exact" keeps the continuous
router mapping (a target such as ONNX can run it) and shows what the one-hot constraint costs.
Search time is wall time of the pass (statistics, search, final evaluation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moecompile import frontend
from moecompile.analysis.calibration import build_calib
from moecompile.analysis.eep import EEPConfig
from moecompile.evaluation import evaluate
from moecompile.evaluation.backends import IRBackend
from moecompile.passes.base import apply
from moecompile.passes.prune_experts import PruneExperts
from moecompile.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]

RANDOM_DRAWS = 3
COLUMNS = ("random", "frequency", "mass", "reconstruct", "eep", "eep_exact")
HEADERS = {"random": "random (mean of 3)", "frequency": "frequency", "mass": "router mass",
           "reconstruct": "reconstruct", "eep": "EEP (1-hot)", "eep_exact": "EEP exact"}


def accuracy(model, tasks: list[str], n: int) -> float:
    result = evaluate(IRBackend(model), tasks=tasks, n=n, progress=False)
    return sum(r["accuracy"] for r in result["tasks"].values()) / len(tasks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "moe-tiny"))
    p.add_argument("--experts", default="4,2")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--calib-n", type=int, default=32, help="calib examples per task")
    p.add_argument("--n-test", type=int, default=100, help="test examples per task")
    p.add_argument("--budget", type=int, default=400, help="EEP evaluations")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    model = frontend.load(args.model)
    tasks = args.tasks.split(",")
    settings = [[t] for t in tasks] + ([tasks] if len(tasks) > 1 else [])
    rows = []
    full = {tuple(s): accuracy(model, s, args.n_test) for s in settings}
    for n_keep in [int(x) for x in args.experts.split(",")]:
        for setting in settings:
            name = setting[0] if len(setting) == 1 else "all mixed"
            spec = ",".join(setting)
            calib = build_calib(model, spec, args.calib_n if len(setting) == 1
                                else max(4, args.calib_n // 2))
            row = {"experts": n_keep, "calib": name, "unpruned": full[tuple(setting)],
                   "acc": {}, "fitness": {}, "seconds": {}}
            for method in COLUMNS:
                draws = range(RANDOM_DRAWS) if method == "random" else [0]
                accs, fits, secs = [], [], []
                for seed in draws:
                    t0 = time.monotonic()
                    pruned, report = apply(PruneExperts(
                        n_keep, method.replace("_exact", ""),
                        EEPConfig(evaluations=args.budget, seed=seed),
                        "exact" if method == "eep_exact" else "onehot"), model, calib, seed=seed)
                    secs.append(time.monotonic() - t0)
                    accs.append(accuracy(pruned, setting, args.n_test))
                    fits.append(report["fitness"])
                row["acc"][method] = sum(accs) / len(accs)
                row["fitness"][method] = sum(fits) / len(fits)
                row["seconds"][method] = sum(secs) / len(secs)
            rows.append(row)
            print(format_row(row), flush=True)
    print()
    print(format_table(rows, args))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def format_row(row: dict) -> str:
    return (f"N={row['experts']} {row['calib']:>9}: unpruned {row['unpruned']:.3f} | "
            + " ".join(f"{m} {row['acc'][m]:.3f}" for m in COLUMNS)
            + f" | eep {row['seconds']['eep']:.0f}s")


def format_table(rows: list[dict], args) -> str:
    head = ("| kept | calibration | unpruned | " + " | ".join(HEADERS[m] for m in COLUMNS)
            + " | EEP search s |")
    lines = [f"Test-split exact match (n={args.n_test} per task; 'all mixed' is the mean over "
             f"tasks), calib {args.calib_n} examples per task, EEP {args.budget} evaluations:",
             "", head, "|---" * (len(COLUMNS) + 4) + "|"]
    for r in rows:
        best_base = max(r["acc"][m] for m in ("random", "frequency", "mass", "reconstruct"))
        cells = []
        for m in COLUMNS:
            cell = f"{r['acc'][m]:.2f}"
            if m == "eep" and r["acc"][m] >= best_base:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {r['experts']} | {r['calib']} | {r['unpruned']:.2f} | "
                     + " | ".join(cells) + f" | {r['seconds']['eep']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
