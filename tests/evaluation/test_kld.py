"""The text report (kld.py): perplexity and KL(base‖model) in llama-perplexity's convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moecompile.errors import UserError
from moecompile.evaluation.backends import HFBackend, open_backend
from moecompile.evaluation.kld import text_chunks, text_report
from moecompile.tasks import corpus_texts

CTX = 32


def _text() -> str:
    return "\n".join(corpus_texts("test"))[:20_000]


def _torch_logprobs(folder, chunks):
    """float64 log-softmax of a transformers model's own logits, one unpadded chunk at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([c])).logits[0].double().log_softmax(-1) for c in chunks]


def test_report_matches_a_direct_computation_on_two_different_models(tiny_model):
    """Two qwen3_moe models that differ only in their random seed (same tokenizer): every
    number of the report recomputed from the transformers models' logits."""
    base_dir, model_dir = tiny_model("qwen3_moe"), tiny_model("qwen3_moe", seed=1)
    base, model = HFBackend(base_dir), HFBackend(model_dir)
    chunks = text_chunks(base, _text(), CTX, max_chunks=3)
    assert len(chunks) == 3 and all(c[0] == base.bos for c in chunks)
    report = text_report(model, chunks, base, batch_size=2, progress=False)

    lb_all, lm_all = _torch_logprobs(base_dir, chunks), _torch_logprobs(model_dir, chunks)
    kl, same, dp, nll_m, nll_b = [], [], [], [], []
    first = CTX // 2
    for chunk, lb, lm in zip(chunks, lb_all, lm_all):
        lb, lm = lb[first:CTX - 1], lm[first:CTX - 1]  # rows predicting tokens first+1 .. CTX-1
        target = torch.tensor(chunk[first + 1:])
        rows = torch.arange(len(target))
        kl.append((lb.exp() * (lb - lm)).sum(-1))
        same.append(lb.argmax(-1) == lm.argmax(-1))
        dp.append(lm[rows, target].exp() - lb[rows, target].exp())
        nll_m.append(-lm[rows, target])
        nll_b.append(-lb[rows, target])
    kl, same, dp = torch.cat(kl).numpy(), torch.cat(same).numpy(), torch.cat(dp).numpy()
    nll_m, nll_b = torch.cat(nll_m).numpy(), torch.cat(nll_b).numpy()
    n = kl.size
    assert report["tokens"] == n == 3 * (CTX - 1 - CTX // 2)
    assert report["kl"]["mean"] == pytest.approx(kl.mean(), rel=1e-4)
    assert report["kl"]["mean"] > 0.01  # different weights: a real divergence to measure
    assert report["kl"]["stderr"] == pytest.approx(kl.std() / np.sqrt(n - 1), rel=1e-3)
    for q in (99.9, 99.0, 95.0, 50.0, 5.0):
        assert report["kl"][f"p{q:g}"] == pytest.approx(np.percentile(kl, q), rel=1e-3, abs=1e-7)
    assert report["kl"]["max"] == pytest.approx(kl.max(), rel=1e-4)
    assert report["same_top"]["p"] == pytest.approx(same.mean())
    assert report["same_top"]["stderr"] == pytest.approx(
        np.sqrt(same.mean() * (1 - same.mean()) / (n - 1)))
    assert report["rms_delta_p"] == pytest.approx(np.sqrt((dp ** 2).mean()), rel=1e-4)
    assert report["ppl"] == pytest.approx(np.exp(nll_m.mean()), rel=1e-5)
    assert report["base_ppl"] == pytest.approx(np.exp(nll_b.mean()), rel=1e-5)
    assert report["ppl_ratio"] == pytest.approx(report["ppl"] / report["base_ppl"], rel=1e-9)


def test_a_model_against_itself_and_its_f32_files(compiled):
    hf = open_backend(compiled["hf"])
    chunks = text_chunks(hf, _text(), 64, max_chunks=2)
    same = text_report(hf, chunks, hf, progress=False)
    assert same["kl"]["mean"] == pytest.approx(0.0, abs=1e-12) and same["same_top"]["p"] == 1.0
    assert same["ppl_ratio"] == pytest.approx(1.0) and same["ppl"] > 1.0
    for kind in ("gguf", "onnx"):
        r = text_report(open_backend(compiled[kind]), chunks, hf, progress=False)
        assert r["kl"]["mean"] < 1e-6 and r["same_top"]["p"] == 1.0, kind
        assert r["ppl"] == pytest.approx(same["ppl"], rel=1e-4), kind
        assert r["rms_delta_p"] < 1e-4, kind


def test_perplexity_alone_and_too_short_a_text(qwen3):
    backend = HFBackend(qwen3)
    chunks = text_chunks(backend, _text(), CTX, max_chunks=2)
    alone = text_report(backend, chunks, progress=False)
    assert set(alone) >= {"ppl", "tokens", "per_chunk"} and "kl" not in alone
    assert len(alone["per_chunk"]) == 2
    with pytest.raises(UserError, match="fewer than one chunk of 512"):
        text_chunks(backend, "def f(): pass\n", 512, source="short.txt")
