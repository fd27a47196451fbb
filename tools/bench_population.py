"""Benchmark the searches' candidate evaluation at real size: a generation per layer-major
pass against a streaming pass per candidate, side by side in one run.

    python tools/bench_population.py [--model .bench/scale/olmoe-1b-7b-4l] [--eep 40]
                                     [--topk 16] [--json OUT.json]

On a real-shape checkpoint (default: tools/bench_scale.py's 4-layer OLMoE-1B-7B; written
if missing) each search runs twice in a fresh process, with the same configuration, so both
take the same steps (asserted: the same plans, the fitness to 1e-5):

- population: the search as it runs in this process (analysis/population.py): its children
  made in generations of `--search-batch` (8), each generation scored by one pass that reads
  every block once, shares common layers and starts children from their parents' kept states;
- pass per candidate: the full-model evaluation the search used before, one streaming pass per
  candidate (what a Ray search still does, its token shards on the workers), forced here by an
  in-process engine that says it is distributed.

Searches: EEP `--experts 32` (`--eep` evaluations; an initial population of 8, then children:
the default search is 30 and 370) and the `--top-k 4` search (`--topk` evaluations, every
candidate a merge), children in batches of 8 (the CLI's default `--search-batch`), on the
default calibration (32 chunks, 4096 tokens, KL to the original).
Printed: seconds per evaluation of each, their ratio, peak RSS of each process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_SEARCH = """
import json, resource, sys, time
from moecompile import frontend
from moecompile.analysis.calibration import build_calib
from moecompile.analysis.eep import EEPConfig
from moecompile.distributed.engine import Engine
from moecompile.job import default_calibration
from moecompile.passes.base import apply
from moecompile.passes.prune_experts import PruneExperts
from moecompile.passes.reduce_top_k import ReduceTopK


class PassPerCandidate(Engine):
    name = "pass-per-candidate"
    distributed = True  # candidates_at_size: one streaming pass per candidate, here


path, search, evaluations, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = frontend.load(path)
calib = build_calib(model, default_calibration(path)[0], 32)
config = EEPConfig(evaluations=evaluations, max_init=8, batch=8, asked=True)  # as the CLI
step = (PruneExperts(32, "eep", config) if search == "eep"
        else ReduceTopK(4, "search", config))
engine = Engine() if how == "population" else PassPerCandidate()
t = time.perf_counter()
_, report = apply(step, model, calib, engine=engine)
print(json.dumps({"search": search, "how": how, "wall_s": time.perf_counter() - t,
                  "evaluations": report["evaluations"],
                  "seconds_per_evaluation": report["seconds_per_evaluation"],
                  "fitness": report["fitness"], "layers": report["layers"],
                  "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def measure(model: Path, search: str, evaluations: int, how: str) -> dict:
    log(f"{search}, {evaluations} evaluations, {how}")
    proc = subprocess.run([sys.executable, "-c", _SEARCH, str(model), search, str(evaluations),
                           how], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    out = json.loads(proc.stdout.splitlines()[-1])
    log(json.dumps({k: v for k, v in out.items() if k != "layers"}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / ".bench" / "scale" / "olmoe-1b-7b-4l")
    p.add_argument("--eep", type=int, default=40, help="EEP evaluations (0: skip)")
    p.add_argument("--topk", type=int, default=16, help="top-k search evaluations (0: skip)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not (args.model / "config.json").exists():
        log(f"writing a 4-layer olmoe-1b-7b checkpoint into {args.model}")
        subprocess.run([sys.executable, "-m", "moecompile.testing.synthetic", "olmoe-1b-7b",
                        str(args.model), "--layers", "4"], check=True,
                       stdout=subprocess.DEVNULL)
    rows = []
    for search, evaluations in (("eep", args.eep), ("topk", args.topk)):
        if not evaluations:
            continue
        pop, each = (measure(args.model, search, evaluations, how)
                     for how in ("population", "pass-per-candidate"))
        same = pop["layers"] == each["layers"] and abs(pop["fitness"] - each["fitness"]) < 1e-5
        if not same:
            raise SystemExit(f"{search}: the two evaluations took different steps")
        rows.append((search, pop, each))
    print("| search | evaluations | pass per candidate s/eval | population s/eval | ratio | "
          "peak GiB (each / population) |")
    print("|---|---:|---:|---:|---:|---|")
    for search, pop, each in rows:
        ratio = each["seconds_per_evaluation"] / max(pop["seconds_per_evaluation"], 1e-9)
        print(f"| {search} | {pop['evaluations']} | {each['seconds_per_evaluation']:.2f} | "
              f"{pop['seconds_per_evaluation']:.2f} | {ratio:.2f}x | "
              f"{each['peak_gib']:.2f} / {pop['peak_gib']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps([{"search": s, "population": p, "pass_per_candidate": e}
                                         for s, p, e in rows], indent=2))


if __name__ == "__main__":
    main()
