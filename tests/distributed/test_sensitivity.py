"""The quantization sensitivity split over Ray workers by unit: every (unit, type) is computed
as this process computes it, so the full and the layer-local measurements, the probes that
scale the latter to KL, are the same on two workers as in this process (test_cli.py: the
file `--quant auto` writes, with `--ray` and without)."""

import pickle

import pytest

from moecompile import frontend
from moecompile.analysis import sensitivity
from moecompile.analysis.calibration import build_calib
from moecompile.analysis.fitness import StreamingFitness
from moecompile.distributed.engine import Engine
from moecompile.exporters.gguf.target import GGUFTarget, group_units
from moecompile.runtime.streaming import StreamingExecutor


CANDIDATES = ["q8_0", "q4_k"]


@pytest.fixture(scope="module")
def setup(tiny_model):
    # a shared expert: every kind of unit (attention, experts, the shared expert's MLP, the
    # embedding, the head) is measured; rows of 256 hold k-quant blocks
    model = frontend.load(tiny_model("qwen2_moe", hidden_size=256, moe_intermediate_size=64,
                                     shared_expert_intermediate_size=128))
    target = GGUFTarget()
    units = group_units(target.groups(model))
    return model, build_calib(model, "add", 2), units, target._rounding(model, None)


def test_unit_shards_deal_every_unit_once(setup):
    _, _, units, _ = setup
    for n in (1, 2, 3, len(units), len(units) + 5):
        shards = sensitivity.unit_shards(units, n)
        assert len(shards) == min(n, len(units))
        assert sorted(u for s in shards for u in s) == sorted(units)
        kinds = [{sensitivity.unit_kind(units[u]) for u in s} for s in shards]
        if n == 2:  # dealt round-robin: each worker gets attention and experts
            assert all({"attention", "experts"} <= k for k in kinds)


def test_full_sensitivity_on_two_workers_equals_this_process(ray_engine, setup, like_a_worker):
    model, calib, units, rounding = setup
    want = like_a_worker(lambda: sensitivity.measure(model, calib, units, CANDIDATES, rounding,
                                                  progress=False))
    tasks = ray_engine.tasks
    got = sensitivity.measure(model, calib, units, CANDIDATES, rounding, progress=False,
                              engine=ray_engine)
    assert ray_engine.tasks - tasks == 2
    assert list(got) == list(units)
    assert got == want
    assert all(got[u]["q4_k"] > got[u]["q8_0"] > 0 for u in units if "ffn_down" in u)


def test_layer_local_sensitivity_on_two_workers_equals_this_process(ray_engine, setup,
                                                                   like_a_worker):
    model, calib, units, rounding = setup
    want, want_info, want_check = like_a_worker(lambda: sensitivity.local_losses(
        model, calib, units, CANDIDATES, rounding, "q4_k", progress=False))
    tasks = ray_engine.tasks
    got, info, check = sensitivity.local_losses(model, calib, units, CANDIDATES, rounding,
                                                "q4_k", progress=False, engine=ray_engine)
    groups = sensitivity.probe_groups(units)
    assert ray_engine.tasks - tasks == 2 + len(groups)  # the errors, then one probe per group
    # bit for bit on an AVX-512 Xeon; on an AMD EPYC (AVX2) a worker's results differ from
    # this process's at one thread by up to 1.3e-5 relative (torch's kernels there sum in
    # another order: this process's own errors differ between one and two threads), and on
    # another AMD EPYC (2026-12-05) by 1.16e-4, the same at f75623f: a probe's KL of ~1e-6 is
    # a mean of float32 log-probability differences, whose last bits move with the order
    assert list(got) == list(want) and info.keys() == want_info.keys()
    for u in want:
        assert got[u] == pytest.approx(want[u], rel=5e-4, abs=1e-12), u
    assert info["probe_kl"] == pytest.approx(want_info["probe_kl"], rel=5e-4)
    assert set(info["probe_kl"]) == set(groups)
    assert {g.split(",")[0] for g in groups} == {"attention", "experts", "mlp", "embedding"}
    with rounding("q4_k") as value:  # the end-to-end check runs here, on the same reference
        paths = {p for ps in units.values() for p in ps}
        assert check(paths, value) == pytest.approx(want_check(paths, value), rel=1e-4)
        assert check(paths, value) > 0


def test_the_in_process_engine_is_the_default(setup):
    model, calib, units, rounding = setup
    engine = Engine("cpu")
    got = sensitivity.measure(model, calib, units, CANDIDATES[:1], rounding, progress=False,
                              engine=engine)
    assert engine.tasks == 1
    assert got == sensitivity.measure(model, calib, units, CANDIDATES[:1], rounding,
                                      progress=False)


def test_references_sent_to_workers_hold_each_token_once(setup):
    """The original's top-K log-probabilities travel to the workers (the probes, a pruning's
    streaming KL): each token's row must pickle alone, not with the chunk it was computed in —
    which made 1024 measurement tokens of the bundled model 12 GB per worker."""
    model, _, _, _ = setup
    calib = build_calib(model, "default", 4)
    kl, fit = sensitivity.StreamingKL(), StreamingFitness(calib)

    def both(rows, logits):
        kl.consume(rows, logits)
        fit.consume(rows, logits)

    StreamingExecutor(model, "cpu").run(calib.ids, calib.mask, both)  # the head in chunks
    for top in (kl.top, fit.top):
        tokens, k = len(top), next(iter(top.values()))[0].numel()
        assert tokens > 50
        assert len(pickle.dumps(top)) < 1.5 * tokens * k * (8 + 4) + 2000 * tokens


def test_probe_groups_split_each_kind_into_halves_of_the_blocks():
    units = {f"blk.{i}.{name}": [f"blocks.{i}.{path}"] for i in range(5)
             for name, path in (("attn", "attn.q"), ("down", "ffn.experts.0.down"))}
    units["token_embd"], units["output"] = ["embed"], ["lm_head"]
    groups = sensitivity.probe_groups(units)
    assert groups == {
        "attention, blocks 0-2": ["blk.0.attn", "blk.1.attn", "blk.2.attn"],
        "experts, blocks 0-2": ["blk.0.down", "blk.1.down", "blk.2.down"],
        "attention, blocks 3-4": ["blk.3.attn", "blk.4.attn"],
        "experts, blocks 3-4": ["blk.3.down", "blk.4.down"],
        "embedding": ["token_embd"]}
    one = {u: p for u, p in units.items() if u.startswith("blk.0.")}
    assert list(sensitivity.probe_groups(one)) == ["attention, block 0", "experts, block 0"]
