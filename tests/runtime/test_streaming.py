"""The layer-major executor: the same numbers as the token-major one on every family (also on
a file's verification numerics), observers that merge across token shards, and memory that
follows one block, not the depth."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from moecompile import frontend
from moecompile.analysis.calibration import build_calib
from moecompile.analysis.observers import (ImportanceObserver, Observers, RouterObserver,
                                           SimilarityObserver)
from moecompile.runtime import ReferenceExecutor
from moecompile.runtime.streaming import StreamingExecutor
from moecompile.testing.models import ARCHS


@pytest.fixture(scope="module")
def calib_of():
    cache = {}

    def get(model):
        if model.source not in cache:
            cache[model.source] = build_calib(model, "add,rev,brackets", 3)
        return cache[model.source]
    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_same_logits_as_the_token_major_executor(tiny_model, calib_of, arch):
    model = frontend.load(tiny_model(arch))
    calib = calib_of(model)
    real = calib.mask.bool()
    want = ReferenceExecutor(model, "cpu").logits(calib.ids, calib.mask)[real]
    for batch in (1, 4):  # attention in batches of sequences: the result does not depend on it
        got = StreamingExecutor(model, "cpu", sequence_batch=batch).logits(calib.ids,
                                                                           calib.mask)[real]
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("flags", [["--quant", "q4_k"], ["--target", "onnx", "--quant", "int4"]])
def test_same_logits_on_a_files_numerics(tiny_model, tmp_path, flags):
    """The verification hooks (weights from the written file, kernel-input rounding) run the
    same in both executors."""
    from moecompile.cli import main
    from moecompile.exporters.gguf.reader import FileNumerics
    from moecompile.exporters.gguf.target import GGUFTarget
    from moecompile.exporters.onnx.numerics import OnnxNumerics
    from moecompile.exporters.onnx.target import linear_weights

    folder = tiny_model("mixtral", hidden_size=256, intermediate_size=256)
    model = frontend.load(folder)
    if flags[0] == "--target":
        out = tmp_path / "m.onnx"
        numerics = OnnxNumerics(model.with_types({p: "int4" for p in linear_weights(model)}))
    else:
        out = tmp_path / "m.gguf"
        assert main([str(folder), "-o", str(out), "--no-verify", "--quiet", *flags]) == 0
        typed = GGUFTarget().typed(model, {t.name: "q4_k" for t in GGUFTarget().quantizable(model)})
        from moecompile.exporters.gguf import writer

        numerics = FileNumerics(out, writer.plan(typed, "llama"))
    ids = torch.randint(0, model.vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    want = ReferenceExecutor(model, "cpu", numerics).logits(ids)
    got = StreamingExecutor(model, "cpu", numerics).logits(ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (got - want).abs().max()


def _observe(model, calib, rows):
    importance = ImportanceObserver({p for p, t in model.tensors() if len(t.shape) == 2},
                                    min_tokens=0)
    router, similarity = RouterObserver(), SimilarityObserver(model)
    StreamingExecutor(model, "cpu", observer=Observers(importance, router, similarity)).run(
        calib.ids[rows], calib.mask[rows], head=lambda r, logits: None)
    return importance, router, similarity


@pytest.mark.parametrize("shards", [2, 3])
def test_observer_states_merge_across_token_shards(tiny_model, calib_of, shards):
    model = frontend.load(tiny_model("qwen2_moe"))
    calib = calib_of(model)
    whole = _observe(model, calib, slice(None))
    parts = [_observe(model, calib, idx.tolist())
             for idx in np.array_split(np.arange(calib.n_examples), shards)]
    merged = parts[0]
    for other in parts[1:]:
        merged = tuple(m.merge(o) for m, o in zip(merged, other))
    imp, router, sim = merged
    # counts are exact; sums agree to float tolerance (a shard's forward pass rounds its
    # matmuls in another batch shape, ~1e-7 relative)
    assert imp.counts == whole[0].counts
    for path, value in whole[0].sums.items():
        assert torch.allclose(imp.sums[path], value, rtol=1e-5), path
    for block, freq in whole[1].frequency.items():
        assert torch.equal(router.frequency[block], freq)
        assert torch.allclose(router.mass[block], whole[1].mass[block], rtol=1e-5)
        assert torch.allclose(router.saliency(block), whole[1].saliency(block), rtol=1e-5)
    blocks, layers = sim.similarities()
    want_blocks, want_layers = whole[2].similarities()
    assert blocks == pytest.approx(want_blocks, rel=1e-5)
    assert [x for x in layers if x is not None] == pytest.approx(
        [x for x in want_layers if x is not None], rel=1e-5)


def test_statistics_match_the_token_major_baselines(tiny_model, calib_of):
    """Router frequency and block similarities from the streaming observers equal what the
    token-major baselines compute."""
    from moecompile.analysis.baselines import collect_layer_io
    from moecompile.analysis.similarity import similarities

    model = frontend.load(tiny_model("olmoe"))
    calib = calib_of(model)
    _, router, sim = _observe(model, calib, slice(None))
    for layer, io in collect_layer_io(model, calib).items():
        want = torch.bincount(io.routed.reshape(-1), minlength=model.blocks[layer].ffn.n_experts)
        assert torch.equal(router.frequency[layer].long(), want)
    blocks, layers = similarities(model, calib)
    got_blocks, got_layers = sim.similarities()
    assert got_blocks == pytest.approx(blocks, abs=1e-5)
    assert [g for g in got_layers if g is not None] == pytest.approx(
        [w for w in layers if w is not None], abs=1e-5)


_PEAK = textwrap.dedent("""
    import resource, sys, torch
    from moecompile import frontend
    from moecompile.runtime.streaming import StreamingExecutor
    model = frontend.load(sys.argv[1])
    ids = torch.randint(0, model.vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    StreamingExecutor(model, "cpu").logits(ids)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


@pytest.mark.slow
def test_peak_memory_follows_one_block_not_the_depth(tmp_path):
    """1 and 8 layers of a model whose layer holds 100 MB of float32 experts: the 8-layer run
    may not hold more than half a layer more (token-major would hold 700 MB more)."""
    from moecompile.testing.synthetic import write_checkpoint

    peaks = {}
    for layers in (1, 8):
        folder = tmp_path / f"l{layers}"
        write_checkpoint("olmoe-1b-7b", folder, layers, shard_bytes=2**31,
                         overrides={"hidden_size": 512, "intermediate_size": 1024,
                                    "num_experts": 16, "vocab_size": 4096,
                                    "num_attention_heads": 8, "num_key_value_heads": 8})
        proc = subprocess.run([sys.executable, "-c", _PEAK, str(folder)], capture_output=True,
                              text=True, check=True)
        peaks[layers] = int(proc.stdout.split()[-1])
    layer_f32 = 16 * 3 * 512 * 1024 * 4
    assert peaks[8] - peaks[1] < layer_f32 / 2, json.dumps(peaks)


def test_an_interrupted_pass_resumes_at_the_first_unfinished_block(tiny_model, calib_of,
                                                                   tmp_path, monkeypatch):
    """Ctrl-C while block 2 is computed, then the same pass again: it starts at block 2 (0 and 1
    had finished) and ends with the same sums as a pass never interrupted; its saved state is
    gone once it completes."""
    from moecompile.runtime.resume import ENV, cache_root, resume_for

    monkeypatch.setenv(ENV, str(tmp_path / "resume"))
    model = frontend.load(tiny_model("olmoe", num_hidden_layers=3))
    calib = calib_of(model)
    paths = {p for p, t in model.tensors() if len(t.shape) == 2}

    class StopAfter(ImportanceObserver):
        def block(self, block, h_in, h_mid, h_out):
            super().block(block, h_in, h_mid, h_out)
            if block == 2:
                raise KeyboardInterrupt

    whole = ImportanceObserver(paths)
    StreamingExecutor(model, "cpu", observer=whole).run(calib.ids, calib.mask, None)
    with pytest.raises(KeyboardInterrupt):
        StreamingExecutor(model, "cpu", observer=StopAfter(paths)).run(
            calib.ids, calib.mask, None, resume_for(model, calib, "test"))
    assert list(cache_root().iterdir())  # progress kept
    again = ImportanceObserver(paths)
    ex = StreamingExecutor(model, "cpu", observer=again)
    ex.run(calib.ids, calib.mask, None, resume_for(model, calib, "test"))
    assert ex.blocks_run == 1  # blocks 0 and 1 were not redone
    assert again.counts == whole.counts
    for path, value in whole.sums.items():
        assert torch.equal(again.sums[path], value), path
    assert not list(cache_root().iterdir())  # removed once complete
    # another calibration set is another pass: nothing of this one is reused
    other = build_calib(model, "sort", 2)
    assert resume_for(model, other, "test").folder != resume_for(model, calib, "test").folder


def test_a_pass_saved_by_other_code_is_not_resumed(tiny_model, calib_of, tmp_path,
                                                   monkeypatch):
    """The resume key covers moecompile's code — the package, its passes and its exporters —
    so a checkout edited between Ctrl-C and the rerun starts the pass again."""
    from moecompile.runtime import resume

    files = [str(p) for p in resume.code_files()]
    for part in ("runtime/streaming.py", "passes/prune_experts.py", "gguf/writer.py"):
        assert any(f.endswith(part) for f in files), part
    code = tmp_path / "observers.py"
    code.write_text("x = 1\n")
    monkeypatch.setattr(resume, "code_files", lambda: [code])
    first = resume.code_digest.__wrapped__()
    code.write_text("x = 2\n")
    assert resume.code_digest.__wrapped__() != first
    model = frontend.load(tiny_model("olmoe"))
    calib = calib_of(model)
    before = resume.resume_for(model, calib, "test").folder
    assert resume.resume_for(model, calib, "test").folder == before
    monkeypatch.setattr(resume, "code_digest", lambda: b"edited")
    assert resume.resume_for(model, calib, "test").folder != before
