"""Data parallelism: a calibration pass split by examples over Ray workers, its observer and
fitness states merged, equals one pass over everything — exactly with one shard (the same
computation), to float tolerance with two and three (other batch shapes, other summation
order), and counts exactly always."""

import pytest
import torch

from moecompile import frontend
from moecompile.analysis.baselines import ReconstructionObserver
from moecompile.analysis.calibration import build_calib, spread_rows
from moecompile.analysis.fitness import StreamingFitness
from moecompile.analysis.neurons import NeuronObserver, mlp_paths
from moecompile.analysis.observers import (ImportanceObserver, Observers, RouterObserver,
                                           SimilarityObserver)
from moecompile.analysis.shards import split, stream
from moecompile.passes.reduce_top_k import with_top_k
from moecompile.runtime.streaming import StreamingExecutor


@pytest.fixture(scope="module")
def setup(tiny_model):
    model = frontend.load(tiny_model("qwen2_moe"))  # shared expert, no top-k renormalisation
    return model, build_calib(model, "add,rev,brackets", 3), build_calib(model, "default", 4)


def observers(model):
    # min_tokens above the tokens of the set: every expert is topped up, so the merge of the
    # shards' top-up candidates is what is checked
    paths = {p for p, t in model.tensors() if len(t.shape) == 2}
    return Observers(ImportanceObserver(paths, min_tokens=80), RouterObserver(),
                     SimilarityObserver(model))


def single(model, calib, text_calib):
    """The unsharded pass, in this process, as the code without an engine ran it."""
    obs, fit = observers(model), StreamingFitness(calib)
    ex = StreamingExecutor(model, "cpu", observer=obs)
    ex.run(calib.ids, calib.mask, fit.consume)
    obs.observers[0].top_up(ex)
    ref = StreamingFitness(text_calib)
    StreamingExecutor(model, "cpu").run(text_calib.ids, text_calib.mask, ref.consume)
    kl = StreamingFitness(text_calib, ref)
    StreamingExecutor(with_top_k(model, 1), "cpu").run(text_calib.ids, text_calib.mask,
                                                       kl.consume)
    return obs, fit, ref, kl


def neurons(model, calib):
    """Expert slimming's statistics (full second moments in two hold-out halves) of every MLP:
    routed experts, the shared expert (gated) and nothing else."""
    return NeuronObserver(model, calib, set(mlp_paths(model, shared=True)), full=True)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_neuron_statistics_of_merged_shards_equal_the_single_run(ray_engine, setup, shards,
                                                                 like_a_worker):
    """The hold-out halves are the examples' parity in the whole set, also inside a shard: an
    odd shard boundary must not swap them."""
    model, calib, _ = setup
    want = neurons(model, calib)
    like_a_worker(lambda: StreamingExecutor(model, "cpu", observer=want).run(
        calib.ids, calib.mask, lambda r, logits: None))
    got, _ = stream(ray_engine, model, calib, neurons(model, calib), shards=shards)
    if shards > 1:  # a shard starts on an odd example: its first token is in half 1
        assert any(s[0] % 2 for s in split(calib, shards)[1:])
    want, got = want.result(), got.result()
    assert want.keys() == got.keys() and len(want) > 8
    for prefix, w in want.items():
        g = got[prefix]
        assert g.tokens == w.tokens, prefix
        for h in (0, 1):
            if shards == 1:  # the same computation
                assert torch.equal(g.sums[h], w.sums[h]) and g.weights[h] == w.weights[h]
                continue
            # other batch shapes round the activations' last bits (~1e-8 of the largest
            # entry measured); a half swapped at a shard boundary is off by ~1 of it
            for a, b in ((g.sums[h], w.sums[h]), (g.diag[h], w.diag[h])):
                assert (a - b).abs().max() <= 1e-6 * b.abs().max(), (prefix, h)
            assert g.weights[h] == pytest.approx(w.weights[h], rel=1e-6)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_reconstruction_errors_of_merged_shards_equal_the_single_run(ray_engine, setup, shards,
                                                                     like_a_worker):
    """NAEE's per-example errors of every subset (4 experts keep 2: all 6) merge by addition:
    each example stays whole in one shard, so the same subsets win."""
    model, calib, _ = setup
    want = ReconstructionObserver(model, calib, 2, seed=0)
    like_a_worker(lambda: StreamingExecutor(model, "cpu", observer=want).run(
        calib.ids, calib.mask, lambda r, logits: None))
    got, _ = stream(ray_engine, model, calib, ReconstructionObserver(model, calib, 2, seed=0),
                    shards=shards)
    assert want.squares.keys() == got.squares.keys() and len(want.squares) == 2
    for layer, w in want.squares.items():
        assert w.shape == (6, calib.n_examples) and (w > 0).all()
        assert (got.squares[layer] - w).abs().max() <= 1e-6 * w.max(), layer
        assert got.best(layer) == want.best(layer)


def test_reconstruction_takes_examples_holding_its_tokens_spread_over_the_set(
        ray_engine, setup, monkeypatch):
    """At real size only examples holding TOKENS tokens are run through every expert (their
    cost is E/k forwards a token), spread over the set (its first examples are its first
    tasks only); a shard that holds none of them adds nothing."""
    model, calib, _ = setup
    monkeypatch.setattr(ReconstructionObserver, "TOKENS", 40)
    whole, _ = stream(ray_engine, model, calib, ReconstructionObserver(model, calib, 2, seed=0),
                      shards=1)
    rows = spread_rows(calib, 40)
    assert int(calib.mask[rows].sum()) >= 40 and len(rows) < calib.n_examples
    assert rows[-1] >= 6  # into the last task (brackets): the first 40 tokens were add and rev
    others = [r for r in range(calib.n_examples) if r not in rows]
    for w in whole.squares.values():
        assert (w[:, rows] > 0).all() and (w[:, others] == 0).all()
    got, _ = stream(ray_engine, model, calib, ReconstructionObserver(model, calib, 2, seed=0),
                    shards=3)
    for layer, w in whole.squares.items():
        assert (got.squares[layer] - w).abs().max() <= 1e-6 * w.max(), layer


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_merged_shards_equal_the_single_run(ray_engine, setup, shards, like_a_worker):
    model, calib, text_calib = setup
    want_obs, want_fit, want_ref, want_kl = like_a_worker(
        lambda: single(model, calib, text_calib))
    obs, fit = stream(ray_engine, model, calib, observers(model), StreamingFitness(calib),
                      shards=shards)
    obs.observers[0].top_up(StreamingExecutor(model, "cpu"))
    _, ref = stream(ray_engine, model, text_calib, None, StreamingFitness(text_calib),
                    shards=shards)
    _, kl = stream(ray_engine, with_top_k(model, 1), text_calib, None,
                   StreamingFitness(text_calib, ref), shards=shards)

    imp, router, sim = obs.observers
    want_imp, want_router, want_sim = want_obs.observers
    assert imp.counts == want_imp.counts and imp.topped_up == want_imp.topped_up
    assert imp.topped_up  # the top-up ran
    assert router.tokens == want_router.tokens and sim.count == want_sim.count
    for block, freq in want_router.frequency.items():
        assert torch.equal(router.frequency[block], freq)
    assert torch.equal(fit.wrong, want_fit.wrong)
    assert fit.logp_count == want_fit.logp_count and kl.logp_count == want_kl.logp_count
    assert ref.top.keys() == want_ref.top.keys()
    if shards == 1:  # the same computation: bit for bit
        close = torch.equal
        exact = True
    else:
        def close(a, b):
            return torch.allclose(a, b, rtol=1e-5, atol=1e-8)
        exact = False
    for path, value in want_imp.sums.items():
        assert close(imp.sums[path], value), path
    for block in want_router.frequency:
        assert close(router.mass[block], want_router.mass[block])
        assert close(router.saliency(block), want_router.saliency(block))
    got = [*sim.similarities()[0], fit.value(), kl.value(), fit.logp_sum]
    want = [*want_sim.similarities()[0], want_fit.value(), want_kl.value(), want_fit.logp_sum]
    assert got == (want if exact else pytest.approx(want, rel=1e-5, abs=1e-7))
    assert want_kl.value() < -1e-4  # top-1 moved the distribution: a KL worth comparing


def test_split_balances_tokens_and_covers_every_example(setup):
    _, calib, _ = setup
    for n in (1, 2, 3, 5):
        parts = split(calib, n)
        assert len(parts) == min(n, calib.n_examples)
        assert sum(parts, []) == list(range(calib.n_examples))
        tokens = [int(calib.mask[p].sum()) for p in parts]
        longest = int(calib.mask.sum(dim=1).max())
        assert max(tokens) - min(tokens) <= 2 * longest
