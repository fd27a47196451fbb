"""Candidate parallelism: EEP's search with its candidates scored on Ray workers finds what
the search in this process finds — the same genomes, fitness values and answer — also when a
worker is killed in the middle of it."""

import os
import signal
import threading
import time

import numpy as np
import torch
import pytest

from moecompile import frontend
from moecompile.analysis import baselines
from moecompile.analysis.calibration import build_calib
from moecompile.analysis.eep import EEPConfig, search
from moecompile.analysis.expert_plan import moe_layers
from moecompile.distributed.engine import Engine
from moecompile.testing.models import BUNDLED

CONFIG = EEPConfig(evaluations=64, discrete_evals=32, max_init=8, batch=4, seed=3)


@pytest.fixture(scope="module")
def problem():
    model = frontend.load(str(BUNDLED))
    calib = build_calib(model, "add,sort", 4)
    io = baselines.collect_layer_io(model, calib)
    starts = {name: baselines.choose(name, model, io, 4, 0) for name in baselines.EEP_STARTS}
    return model, calib, starts


def run(engine, problem, config=CONFIG, during=None):
    model, calib, starts = problem
    scorer = engine.candidates(model, calib)
    try:
        if during is not None:
            during(scorer)
        return search(scorer, moe_layers(model), 8, 4, starts, config, "onehot", False)
    finally:
        scorer.close()


@pytest.fixture(scope="module")
def serial(problem):
    return run(Engine("cpu"), problem)


def same(a, b):
    assert a.history == b.history  # every evaluation's best-so-far, in order
    assert a.initial == b.initial and a.fitness == b.fitness
    assert a.evaluations == b.evaluations == CONFIG.evaluations
    for layer, plan in a.plans.items():
        assert np.array_equal(plan.merge, b.plans[layer].merge)
        assert np.array_equal(plan.router, b.plans[layer].router)


def test_search_on_two_workers_equals_the_search_in_this_process(ray_engine, problem, serial):
    before = ray_engine.payload_bytes
    found = run(ray_engine, problem)
    same(found, serial)
    scorer = ray_engine.scorers[-1]
    assert scorer.submitted == CONFIG.evaluations  # each candidate scored once
    assert scorer.evaluations == CONFIG.evaluations  # as counted by the workers
    per_candidate = (ray_engine.payload_bytes - before) / scorer.submitted
    assert per_candidate < 4096  # plans travel, not models


def test_a_worker_killed_mid_search_is_replaced_and_the_answer_is_the_same(
        ray_engine, problem, serial):
    victim = ray_engine.worker_pids()[0]
    replaced = ray_engine.replaced

    def kill_after_some_candidates(scorer):
        def watch():
            deadline = time.monotonic() + 120
            while scorer.submitted < 24 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(victim, signal.SIGKILL)
        threading.Thread(target=watch, daemon=True).start()

    found = run(ray_engine, problem, during=kill_after_some_candidates)
    same(found, serial)
    assert ray_engine.replaced == replaced + 1
    assert ray_engine.retried >= 1
    assert victim not in ray_engine.worker_pids()


def test_top_k_search_on_workers_equals_the_search_in_this_process(ray_engine, problem):
    """--top-k's search scores its candidates through the same engine: the same report and
    the same routers, whatever ran them."""
    from moecompile.passes.base import apply
    from moecompile.passes.reduce_top_k import ReduceTopK

    model, calib, _ = problem
    config = EEPConfig(evaluations=24, discrete_evals=8, max_init=4, batch=4, seed=1)
    here, here_report = apply(ReduceTopK(1, "search", config), model, calib)
    there, there_report = apply(ReduceTopK(1, "search", config), model, calib, engine=ray_engine)
    for key in ("fitness_before", "fitness_plain", "fitness", "evaluations", "layers"):
        assert there_report[key] == here_report[key], key
    assert ray_engine.scorers[-1].evaluations >= 24  # scored on the workers
    for (path, a), (_, b) in zip(here.tensors(), there.tensors()):
        assert torch.equal(a.value(), b.value()), path


def test_a_search_at_real_size_on_workers_finds_what_this_process_finds(ray_engine, tiny_model,
                                                                        monkeypatch):
    """Above the streaming threshold a search in this process scores a generation per pass
    (analysis/population.py); on workers each candidate is a pass of its own whose token
    shards go to the workers. Both take the same steps to the same experts and merges."""
    from moecompile.passes.base import apply
    from moecompile.passes.prune_experts import PruneExperts
    from moecompile.runtime import streaming

    model = frontend.load(tiny_model("qwen3_moe"))
    calib = build_calib(model, "add,sort", 4)
    monkeypatch.setattr(streaming, "STREAM_ABOVE", 0)
    run = PruneExperts(2, "eep", EEPConfig(evaluations=24, discrete_evals=12, max_init=4,
                                           batch=4, seed=5, asked=True))
    _, here = apply(run, model, calib)
    _, there = apply(run, model, calib, engine=ray_engine)
    assert "generations" in here and "generations" not in there
    assert here["evaluations"] == there["evaluations"] == 24
    assert here["layers"] == there["layers"]
    assert here["fitness"] == pytest.approx(there["fitness"], abs=1e-5)
