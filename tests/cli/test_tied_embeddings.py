"""A MoE whose output head is its embedding (tie_word_embeddings): one tensor at two IR paths,
which a target may store differently. Every path: GGUF and ONNX exports and their
verification, --quant-map, --quant auto and its sensitivity, and evaluation."""

import json

import pytest

from moecompile import frontend
from moecompile.cli import main
from moecompile.evaluation import evaluate
from moecompile.exporters.gguf.reader import read_tensors


@pytest.fixture(scope="module")
def tied(tiny_model):
    folder = tiny_model("qwen3_moe", tie_word_embeddings=True)
    model = frontend.load(folder)
    assert model.lm_head is model.embed, "the frontend must read the tied head as the embedding"
    return folder


def compile_cli(folder, out, *flags):
    rc = main([str(folder), "-o", str(out), "--quiet", *flags])
    return rc, json.loads(out.with_suffix(".report.json").read_text())


def test_gguf_stores_embedding_and_head_in_different_types(tied, tmp_path):
    qmap = tmp_path / "map.json"
    qmap.write_text(json.dumps({"token_embd": "q8_0", "output": "f16", ".": "q8_0"}))
    out = tmp_path / "m.gguf"
    rc, report = compile_cli(tied, out, "--quant-map", str(qmap))
    assert rc == 0, report["verification"]
    types = {name: t.name for name, _, t, _ in read_tensors(out)}
    assert types["token_embd.weight"] == "Q8_0" and types["output.weight"] == "F16"
    # verified against a reference that reads each path's own dequantized values: far closer
    # to the file than the float model is
    v = report["verification"]
    assert v["passed"] and v["max_abs_diff"] < v["max_abs_diff_float"] / 10
    result = evaluate(str(out), base=str(tied), tasks=["add"], n=4, progress=False)
    assert 0 < result["kl"] < 1.0


def test_lossless_gguf_evaluates_like_its_checkpoint(tied, tmp_path):
    out = tmp_path / "f32.gguf"
    rc, report = compile_cli(tied, out, "--dtype", "f32")
    assert rc == 0 and report["verification"]["top1_agreement"] == 1.0
    result = evaluate(str(out), base=str(tied), tasks=["add"], n=4, progress=False)
    assert result["kl"] < 1e-6 and result["top1_agreement"] == 1.0


def test_gguf_quant_auto_measures_embedding_and_head_apart(tied, tmp_path):
    out = tmp_path / "auto.gguf"
    rc, report = compile_cli(tied, out, "--quant", "auto", "--budget", "40MB", "--ctx", "128",
                             "--calib", "add", "--calib-n", "3")
    assert rc == 0 and report["verification"]["passed"]
    sens = report["quant"]["sensitivity"]
    assert set(sens) >= {"token_embd", "output"}
    assert sens["token_embd"] != sens["output"]  # one tensor, two roles, two measurements
    assert report["memory"]["weights_bytes"] == sum(b for *_, b in read_tensors(out))


@pytest.mark.parametrize("flags", [[], ["--quant", "int4"],
                                   ["--quant", "auto", "--budget", "1MB", "--ctx", "128",
                                    "--calib", "add", "--calib-n", "3"]])
def test_onnx_exports_verify(tied, tmp_path, flags):
    out = tmp_path / "m.onnx"
    rc, report = compile_cli(tied, out, "--target", "onnx", *flags)
    assert rc == 0 and report["verification"]["passed"], report["verification"]
    quantized = report["weights"]["quantized"] if report["weights"] != "f32" else {}
    assert "embed" not in quantized  # gathered rows stay float32
    if flags[:2] == ["--quant", "int4"]:
        assert quantized["lm_head"] == "int4"  # the head, a separate initializer, is blocked
    result = evaluate(str(out), base=str(tied), tasks=["add"], n=4, progress=False)
    assert result["kl"] < (1e-6 if not flags else 1.0)
