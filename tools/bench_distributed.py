"""Benchmark the Ray engine: an EEP search in this process and on 1 and 2 local Ray workers,
side by side, and a model of the speed-up on N GPUs for real MoEs.

    python tools/bench_distributed.py                    # 400 evaluations, the bundled model
    python tools/bench_distributed.py --evaluations 100 --json out.json

Measured, for each engine, on the same search (same seed, batch, calibration): wall time of
the search (the workers' first candidates include building their evaluators; the cluster's
start is timed apart), fitness evaluations per second, bytes moved per candidate (plans there,
fitness back, pickled), and whether the result is identical to the in-process search (it must
be: the batch design of analysis/eep.py). The overhead per task is what one Ray worker adds to
the in-process search on the same cores, divided by its tasks.

The GPU model (printed with its arithmetic) takes the time of one candidate on one GPU as
the FLOPs of a forward pass of the active parameters over the calibration tokens at a stated
fraction of the GPU's peak (no GPU was measured here), adds the measured per-task overhead,
and accounts for the search's batches: B candidates are made from one archive state, so N
workers run ceil(B/N) rounds per batch and the speed-up is capped at B.

The same engines then measure `--quant auto`'s sensitivity (GGUF types, full and layer-local,
split over the workers by unit): wall time of each and whether the tables equal the
in-process ones (they must: every unit is computed as one process computes it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import time
from pathlib import Path

import numpy as np

from moecompile import frontend
from moecompile.analysis import baselines, sensitivity
from moecompile.analysis.calibration import build_calib
from moecompile.analysis.eep import EEPConfig, search
from moecompile.analysis.expert_plan import moe_layers
from moecompile.distributed.engine import Engine
from moecompile.exporters.gguf.target import (CANDIDATES, LOCAL_PROBE, GGUFTarget,
                                               group_units)
from moecompile.testing.models import BUNDLED

# Active parameters per token of each real model, from its config.json (attention, routed
# experts at top-k, router; plus the output head), for the FLOPs of one forward pass.
REAL = {
    # name: (blocks, attention params/block, active expert params/block, head params)
    "OLMoE-1B-7B": (16, 4 * 2048 * 2048, 8 * 3 * 2048 * 1024 + 2048 * 64, 50304 * 2048),
    "Qwen3-30B-A3B": (48, 2048 * 4096 * 2 + 2 * 2048 * 512, 8 * 3 * 2048 * 768 + 2048 * 128,
                      151936 * 2048),
    "Mixtral-8x7B": (32, 2 * 4096 * 4096 + 2 * 4096 * 1024, 2 * 3 * 4096 * 14336 + 4096 * 8,
                     32000 * 4096),
}
GPU_PEAK = 312e12  # A100 bf16 dense FLOP/s
GPU_UTIL = 0.35  # assumed fraction of peak for a prefill-shaped MoE forward pass
CALIB_TOKENS = 32 * 512  # calibration tokens per candidate assumed for a real model


def problem(calib_spec: str, calib_n: int, n_keep: int):
    model = frontend.load(str(BUNDLED))
    calib = build_calib(model, calib_spec, calib_n)
    io = baselines.collect_layer_io(model, calib)
    starts = {name: baselines.choose(name, model, io, n_keep, 0)
              for name in baselines.EEP_STARTS}
    return model, calib, starts


def cpu_seconds() -> float:
    """CPU time of this process and every process under it (a local cluster's workers, its
    raylet and store): what a run costs whatever share of the cores the machine gave it."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def run_search(engine, prob, config: EEPConfig, n_keep: int):
    model, calib, starts = prob
    n_experts = model.blocks[moe_layers(model)[0]].ffn.n_experts
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    scorer = engine.candidates(model, calib)
    try:
        result = search(scorer, moe_layers(model), n_experts, n_keep, starts, config, "onehot",
                        progress=False)
    finally:
        scorer.close()
    wall = time.perf_counter() - t0
    run_search.cpu = cpu_seconds() - cpu0
    return result, wall, scorer


TRIPS = 200


def round_trip(engine) -> float:
    """Mean seconds of an empty call to a worker and back (Ray's cost per task)."""
    import ray

    slot = engine.slots[0].actor
    ray.get(slot.info.remote())
    t0 = time.perf_counter()
    for _ in range(TRIPS):
        ray.get(slot.info.remote())
    return (time.perf_counter() - t0) / TRIPS


def same(a, b) -> bool:
    return (a.history == b.history and a.initial == b.initial and a.fitness == b.fitness
            and all(np.array_equal(p.merge, b.plans[k].merge)
                    and np.array_equal(p.router, b.plans[k].router) for k, p in a.plans.items()))


def model_gpu(overhead_s: float, batch: int, workers=(1, 2, 4, 8, 16)) -> list[dict]:
    rows = []
    for name, (blocks, attn, experts, head) in REAL.items():
        active = blocks * (attn + experts) + head
        flops = 2 * active * CALIB_TOKENS
        t = flops / (GPU_PEAK * GPU_UTIL)
        row = {"model": name, "active_params": active, "flops_per_candidate": flops,
               "seconds_per_candidate": t, "speedup": {}}
        for n in workers:
            rounds = math.ceil(batch / n)  # per batch of B candidates
            row["speedup"][n] = batch * t / (rounds * (t + overhead_s))
        rows.append(row)
    return rows


def run_sensitivity(engine, model, calib) -> dict:
    """`--quant auto`'s GGUF sensitivity, full and layer-local, on `engine`: the tables and
    the wall time of each."""
    target = GGUFTarget()
    units = group_units(target.groups(model))
    rounding = target._rounding(model, None)
    t = time.perf_counter()
    full = sensitivity.measure(model, calib, units, list(CANDIDATES), rounding, progress=False,
                               engine=engine)
    full_s = time.perf_counter() - t
    t = time.perf_counter()
    local, _, _ = sensitivity.local_losses(model, calib, units, list(CANDIDATES), rounding,
                                           LOCAL_PROBE, progress=False, engine=engine)
    return {"full": full, "local": local, "full_s": full_s,
            "local_s": time.perf_counter() - t, "units": len(units)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--evaluations", type=int, default=400)
    p.add_argument("--batch", type=int, default=8, help="--search-batch")
    p.add_argument("--calib", default="add")
    p.add_argument("--calib-n", type=int, default=32)
    p.add_argument("--experts", type=int, default=4, help="experts kept per layer")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    from moecompile.distributed.address import parse_address
    from moecompile.distributed.ray_engine import RayEngine

    prob = problem(args.calib, args.calib_n, args.experts)
    config = EEPConfig(evaluations=args.evaluations, batch=args.batch, seed=0)
    model, calib, _ = prob
    shipped = len(pickle.dumps(model)) + len(pickle.dumps(calib))
    print(f"EEP search, {args.evaluations} evaluations, batch {args.batch}, calibration "
          f"{args.calib} x {args.calib_n} ({calib.n_tokens} tokens), {os.cpu_count()} cores")

    rows = []
    # warm this process up first (torch's first calls, the tokenizer): the in-process search
    # must not pay for what the workers' fresh processes pay in their evaluators' build
    run_search(Engine("cpu"), prob, EEPConfig(evaluations=8, batch=args.batch), args.experts)
    serial, wall, _ = run_search(Engine("cpu"), prob, config, args.experts)
    rows.append({"engine": "in-process", "workers": 1, "start_s": 0.0, "search_s": wall,
                 "evals_per_s": serial.evaluations / wall, "bytes_per_candidate": 0,
                 "cpu_s": run_search.cpu,
                 "identical": True})
    tables = [run_sensitivity(Engine("cpu"), model, calib)]
    for n in (1, 2):
        t0 = time.perf_counter()
        engine = RayEngine(parse_address(f"local:{n}"), "cpu")
        start = time.perf_counter() - t0
        try:
            before = engine.payload_bytes
            found, wall, scorer = run_search(engine, prob, config, args.experts)
            cpu = run_search.cpu
            per = (engine.payload_bytes - before) / max(scorer.submitted, 1)
            trip = round_trip(engine)
            tables.append(run_sensitivity(engine, model, calib))
        finally:
            engine.close()
        rows.append({"engine": "ray", "workers": n, "start_s": start, "search_s": wall,
                     "evals_per_s": found.evaluations / wall, "bytes_per_candidate": per,
                     "identical": same(found, serial), "round_trip_s": trip,
                     "cpu_s": cpu})

    base = rows[0]["search_s"]
    print("\n| engine | workers | cluster start s | search s | evaluations/s | vs in-process "
          "| CPU s | CPU vs in-process | bytes/candidate | same result |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["ratio"] = r["search_s"] / base
        print(f"| {r['engine']} | {r['workers']} | {r['start_s']:.1f} | {r['search_s']:.1f} | "
              f"{r['evals_per_s']:.1f} | {r['ratio']:.2f}x | {r['cpu_s']:.1f} | "
              f"{r['cpu_s'] / rows[0]['cpu_s']:.2f}x | {r['bytes_per_candidate']:.0f} | "
              f"{'yes' if r['identical'] else 'NO'} |")
    one = rows[1]
    overhead = max(r["round_trip_s"] for r in rows[1:])
    print(f"\noverhead per task: an empty call to a worker and back, {overhead * 1e3:.2f} ms "
          f"(mean of {TRIPS}); 1 worker vs in-process on the same cores: "
          f"({one['search_s']:.2f} - {base:.2f}) s / {args.evaluations} = "
          f"{(one['search_s'] - base) / args.evaluations * 1e3:.2f} ms per candidate")
    print(f"put in the object store once per search: the lazy IR and calibration set, "
          f"{shipped / 1024:.0f} KiB pickled (workers read the weights from the checkpoint)")
    two = rows[2]
    print(f"2 workers / in-process, search wall: {two['ratio']:.2f}x "
          f"(with the cluster's start: {(two['search_s'] + two['start_s']) / base:.2f}x)")

    print(f"\n`--quant auto` sensitivity (GGUF, {len(CANDIDATES)} types x "
          f"{tables[0]['units']} units), split over the workers by unit:")
    print("\n| engine | workers | full s | layer-local s | same tables |")
    print("|---|---|---|---|---|")
    for r, t in zip(rows, tables):
        same_tables = t["full"] == tables[0]["full"] and t["local"] == tables[0]["local"]
        r["sensitivity"] = {"full_s": t["full_s"], "local_s": t["local_s"],
                            "identical": same_tables}
        print(f"| {r['engine']} | {r['workers']} | {t['full_s']:.1f} | {t['local_s']:.1f} | "
              f"{'yes' if same_tables else 'NO'} |")

    gpu = model_gpu(overhead, args.batch)
    print(f"\nModel: one candidate on one GPU = 2 x active params x {CALIB_TOKENS} calibration "
          f"tokens / ({GPU_PEAK / 1e12:.0f} TFLOP/s x {GPU_UTIL}); speed-up on N workers = "
          f"B x t / (ceil(B/N) x (t + {overhead * 1e3:.1f} ms)), B = {args.batch}")
    workers = list(gpu[0]["speedup"])
    print("\n| model | active params | FLOPs/candidate | s/candidate (1 GPU) | "
          + " | ".join(f"{n} GPUs" for n in workers) + " |")
    print("|---|---|---|---|" + "---|" * len(workers))
    for g in gpu:
        print(f"| {g['model']} | {g['active_params'] / 1e9:.2f}B | "
              f"{g['flops_per_candidate']:.2e} | {g['seconds_per_candidate']:.2f} | "
              + " | ".join(f"{g['speedup'][n]:.2f}x" for n in workers) + " |")
    if args.json:
        args.json.write_text(json.dumps({"measured": rows, "overhead_s": overhead,
                                         "object_store_bytes": shipped, "model": gpu},
                                        indent=1))


if __name__ == "__main__":
    main()
