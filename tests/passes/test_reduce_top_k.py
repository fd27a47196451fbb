"""Top-k reduction, block drop and MoE-layer drop: exactness, composition, llama.cpp, errors."""

import pytest
import torch

from moecompile import frontend, ir
from moecompile.analysis.calibration import build_calib
from moecompile.analysis.eep import EEPConfig
from moecompile.cli import main
from moecompile.exporters.target import TypeRequest
from moecompile.job import compile_model
from moecompile.passes.base import apply
from moecompile.passes.drop import DropBlocks, DropMoELayers
from moecompile.passes.prune_experts import PruneExperts
from moecompile.passes.reduce_top_k import ReduceTopK
from moecompile.runtime import ReferenceExecutor
from moecompile.testing.models import hf_logits

F32 = TypeRequest(dtype="f32")


def reduce_top_k(model, k, method, calib=None, config=None):
    return apply(ReduceTopK(k, method, config), model, calib)


def trim(model, kind, m, calib):
    return apply((DropBlocks if kind == "blocks" else DropMoELayers)(m), model, calib)


def compile_f32(model, out):
    return compile_model(model, out, "gguf", F32, progress=False)


SMALL = EEPConfig(evaluations=25, seed=3)


@pytest.fixture(scope="module")
def mixtral(tiny_model):
    folder = tiny_model("mixtral", num_hidden_layers=3)
    model = frontend.load(folder)
    return folder, model, build_calib(model, "add,rev", 6)


def logits(model, calib):
    return ReferenceExecutor(model, "cpu").logits(calib.ids, calib.mask)


def test_same_k_and_zero_drops_are_bit_exact(mixtral):
    _, model, calib = mixtral
    want = logits(model, calib)
    same, _ = reduce_top_k(model, 2, "search", calib, config=SMALL)
    assert torch.equal(logits(same, calib), want)
    for kind in ("blocks", "moe_layers"):
        kept, _ = trim(model, kind, 0, calib)
        assert torch.equal(logits(kept, calib), want)


def test_plain_top_k_equals_transformers_with_k_experts(mixtral):
    folder, model, calib = mixtral
    reduced, report = reduce_top_k(model, 1, "plain")
    assert all(b.ffn.top_k == 1 for b in reduced.blocks) and report["top_k_before"] == 2
    want = hf_logits(folder, calib.ids, calib.mask, num_experts_per_tok=1)
    keep = calib.mask.bool()
    assert torch.allclose(logits(reduced, calib)[keep], want[keep], atol=1e-4)


def test_searched_top_k_is_not_worse_than_plain_and_runs_in_llama_cpp(mixtral, tmp_path):
    _, model, calib = mixtral
    reduced, report = reduce_top_k(model, 1, "search", calib, config=SMALL)
    assert report["fitness"] >= report["fitness_plain"]
    assert report["evaluations"] == 25
    result = compile_f32(reduced, tmp_path / "k1.gguf")
    assert result.passed and result.verification.top1_agreement == 1.0


def test_block_drop_renumbers_and_runs_in_llama_cpp(mixtral, tmp_path):
    _, model, calib = mixtral
    dropped, report = trim(model, "blocks", 1, calib)
    assert len(dropped.blocks) == 2 and len(report["dropped"]) == 1
    survivor = [i for i in range(3) if i not in report["dropped"]]
    assert [b.attn.q for b in dropped.blocks] == [model.blocks[i].attn.q for i in survivor]
    # the dropped block is the one whose output is most similar to its input
    sims = report["similarity"]
    assert report["dropped"][0] == max(range(3), key=lambda i: sims[str(i)])
    result = compile_f32(dropped, tmp_path / "b1.gguf")
    assert result.passed, result.verification.summary()
    assert result.report["passes"][0]["dropped"] == report["dropped"]


def test_moe_layer_drop_keeps_attention_and_gguf_refuses_it(mixtral, tmp_path):
    _, model, calib = mixtral
    dropped, report = trim(model, "moe_layers", 2, calib)
    gone = report["dropped"]
    assert len(gone) == 2
    for i, b in enumerate(dropped.blocks):
        assert (b.ffn is None) == (i in gone) and b.attn is model.blocks[i].attn
    assert "no ffn" in ir.format_ir(dropped)
    logits(dropped, calib)  # the reference executor runs it
    with pytest.raises(Exception, match="no FFN"):
        compile_f32(dropped, tmp_path / "l.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("order", ["prune-topk-drop", "drop-topk-prune"])
def test_passes_compose_in_either_order(mixtral, tmp_path, order):
    _, model, calib = mixtral
    steps = {
        "prune": lambda m: apply(PruneExperts(4, "eep", SMALL), m, calib)[0],
        "topk": lambda m: reduce_top_k(m, 1, "search", calib, config=SMALL)[0],
        "drop": lambda m: trim(m, "blocks", 1, calib)[0],
    }
    for name in order.split("-"):
        model = ir.verify(steps[name](model))
    assert len(model.blocks) == 2
    assert all(b.ffn.n_experts == 4 and b.ffn.top_k == 1 for b in model.blocks)
    assert [h["pass"] for h in model.history] == [
        {"prune": "prune_experts", "topk": "top_k", "drop": "drop_blocks"}[n] for n in order.split("-")]
    result = compile_f32(model, tmp_path / "c.gguf")
    assert result.passed


@pytest.mark.parametrize("argv,message", [
    (["--top-k", "0"], "at least 1"),
    (["--top-k", "9", "--topk-method", "plain"], "between 1 and"),
    (["--experts", "2", "--top-k", "3", "--calib", "add"], "exceeds the 2 experts"),
    (["--drop-blocks", "3", "--calib", "add"], "must keep at least one"),
    (["--drop-blocks", "-1", "--calib", "add"], "must not be negative"),
    (["--drop-moe-layers", "1", "--calib", "add"], "no form for a block"),
])
def test_impossible_requests_exit_2(mixtral, tmp_path, capsys, argv, message):
    folder = mixtral[0]
    rc = main([str(folder), "-o", str(tmp_path / "x.gguf"), "--quiet", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["blocks", "moe_layers"])
def test_drops_at_real_size_choose_and_score_as_token_major(mixtral, monkeypatch, kind):
    from moecompile.runtime import streaming

    _, model, calib = mixtral
    small_model, small = trim(model, kind, 1, calib)
    monkeypatch.setattr(streaming, "STREAM_ABOVE", 0)
    large_model, large = trim(model, kind, 1, calib)
    assert large["dropped"] == small["dropped"] and large["executor"] == "streaming"
    assert large["similarity"] == pytest.approx(small["similarity"], abs=1e-5)
    assert large["fitness"] == pytest.approx(small["fitness"], abs=1e-5)
    assert large["fitness_before"] == pytest.approx(small["fitness_before"], abs=1e-5)


def test_top_k_at_real_size_plain_and_searched_as_token_major(mixtral, monkeypatch):
    """Above the streaming threshold plain top-k is scored by passes, and the search scores
    its candidates a generation per pass: the same steps to the same merge and router
    matrices and fitness as the token-major search."""
    from moecompile.runtime import streaming

    _, model, calib = mixtral
    config = EEPConfig(evaluations=12, seed=3)
    _, small_plain = reduce_top_k(model, 1, "plain", calib)
    _, small = reduce_top_k(model, 1, "search", calib, config=config)
    monkeypatch.setattr(streaming, "STREAM_ABOVE", 0)
    _, large_plain = reduce_top_k(model, 1, "plain", calib)
    _, large = reduce_top_k(model, 1, "search", calib, config=config)
    assert large_plain["fitness"] == pytest.approx(small_plain["fitness"], abs=1e-5)
    assert large["executor"] == "streaming" and large["evaluations"] == small["evaluations"]
    assert large["layers"] == small["layers"] and large["fitness"] >= large["fitness_plain"]
    for key in ("fitness", "fitness_plain", "fitness_before"):
        assert large[key] == pytest.approx(small[key], abs=1e-5), key
    assert large["eta_seconds"] > 0


def test_a_long_top_k_search_at_real_size_is_refused_unless_sized(mixtral, monkeypatch):
    from moecompile.errors import UserError
    from moecompile.passes import prune_experts as module
    from moecompile.runtime import streaming

    _, model, calib = mixtral
    monkeypatch.setattr(streaming, "STREAM_ABOVE", 0)
    monkeypatch.setattr(module, "ETA_LIMIT", 0.0)
    with pytest.raises(UserError, match="--search-budget.*--topk-method plain"):
        reduce_top_k(model, 1, "search", calib, config=EEPConfig(evaluations=400))
    _, report = reduce_top_k(model, 1, "search", calib,
                             config=EEPConfig(evaluations=4, asked=True))
    assert report["evaluations"] == 4


def test_top_k_search_on_text_measures_the_kl_to_the_original(tiny_model, tmp_path,
                                                              monkeypatch):
    """With text calibration the fitness is minus the KL to the original model, for the plain
    reduction too (it was measured against the plain reduction itself: always 0, so the
    search could only lose); in memory and at real size alike."""
    from moecompile.runtime import streaming

    model = frontend.load(tiny_model("mixtral", num_hidden_layers=3))
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(60)))
    calib = build_calib(model, str(text), 3)
    config = EEPConfig(evaluations=8, seed=3)
    _, small = reduce_top_k(model, 1, "search", calib, config=config)
    assert small["fitness_before"] == 0.0 and small["fitness_plain"] < -1e-4
    assert small["fitness"] >= small["fitness_plain"]
    monkeypatch.setattr(streaming, "STREAM_ABOVE", 0)
    _, large = reduce_top_k(model, 1, "search", calib, config=config)
    assert large["fitness_plain"] == pytest.approx(small["fitness_plain"], rel=1e-3)
    assert large["layers"] == small["layers"]
