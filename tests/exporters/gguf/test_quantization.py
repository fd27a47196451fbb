"""llama.cpp quantization through llama_model_quantize: exact sizes, per-tensor maps, imatrix."""

import json

import numpy as np
import pytest

from moecompile import frontend
from moecompile.analysis.calibration import build_calib
from moecompile.cli import main
from moecompile.exporters.gguf import imatrix_dat
from moecompile.exporters.gguf.reader import read_tensors
from moecompile.exporters.gguf.target import GGUFTarget
from moecompile.exporters.gguf.types import ggml, stored_type
from moecompile.exporters.target import TypeRequest
from moecompile.job import compile_model
from moecompile.passes.base import PassContext


@pytest.fixture(scope="module")
def models(tiny_model):
    """Rows of 64 (every k-quant falls back) and of 256 (k-quants apply as such)."""
    return {"h64": frontend.load(tiny_model("qwen2_moe")),
            "h256": frontend.load(tiny_model("mixtral", hidden_size=256, intermediate_size=256))}


@pytest.mark.parametrize("qtype", ["q4_k", "q4_0", "q2_k", "iq4_xs", "q6_k", "q5_k", "q3_k"])
@pytest.mark.parametrize("which", ["h64", "h256"])
def test_predicted_weight_bytes_equal_the_file(models, tmp_path, qtype, which):
    model = models[which]
    target = GGUFTarget()
    result = compile_model(model, tmp_path / "q.gguf", "gguf", TypeRequest(quant=qtype),
                           verify=False, progress=False)
    written = {name: (t, b) for name, _, t, b in read_tensors(result.output)}
    assert result.report["tensor_bytes"] == target.weight_bytes(result.plan.model)
    for t in target.planned(model):
        want = ggml(stored_type(t.name, t.shape, qtype))  # F32 where llama.cpp never quantizes
        assert written[t.name][0] == want, t.name
    if which == "h256":  # no fallback: the asked type itself
        assert written["blk.0.ffn_down_exps.weight"][0] == ggml(qtype)


def test_q5_1_fallback_verifies(models, tmp_path):
    """Rows of 64 store q5_k as Q5_1, whose kernel adds each block's minimum times the input
    block's sum as Q8_1 stores it (fp16): without mirroring that sum the median token was
    2e-3 off and the correct file failed."""
    result = compile_model(models["h64"], tmp_path / "q.gguf", "gguf", TypeRequest(quant="q5_k"),
                           progress=False)
    types = {name: t.name for name, _, t, _ in read_tensors(result.output)}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q5_1"
    assert result.report["verification"]["passed"], result.report["verification"]


def test_quant_map_applies_the_first_matching_rule(models, tmp_path):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({r"ffn_down_exps": "q6_k", r"exps": "q4_k", r".": "q8_0"}))
    out = tmp_path / "m.gguf"
    assert main([models["h256"].source, "-o", str(out), "--quant-map", str(mapping),
                 "--no-verify", "--quiet"]) == 0
    types = {name: t.name for name, _, t, _ in read_tensors(out)}
    assert types["blk.1.ffn_down_exps.weight"] == "Q6_K"
    assert types["blk.1.ffn_up_exps.weight"] == "Q4_K"
    assert types["blk.1.attn_q.weight"] == "Q8_0" and types["blk.1.ffn_gate_inp.weight"] == "F32"


@pytest.mark.parametrize("content,message", [
    ("{not json", "not JSON"),
    ('{"attn": "q4_k"}', "no rule for"),
    ('{"(": "q4_k"}', "bad pattern"),
    ('{".": "q9_z"}', "unknown weight type"),
])
def test_bad_quant_maps_exit_2(models, tmp_path, capsys, content, message):
    mapping = tmp_path / "map.json"
    mapping.write_text(content)
    rc = main([models["h64"].source, "-o", str(tmp_path / "x.gguf"), "--quant-map", str(mapping),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_imatrix_shapes_file_and_effect(models, tmp_path):
    model = models["h256"]
    calib = build_calib(model, "add,rev", 4)
    target = GGUFTarget()
    imat, calls, coverage = target.importance(model, PassContext(calib=calib))
    assert calls == calib.n_examples
    assert coverage["min_tokens"] == 64 and not coverage["topped_up"]
    for t in target.quantizable(model):
        # one value per input column, per expert for stacked expert tensors
        assert imat[t.name].shape == (t.shape[-1] * (len(t.parts) if len(t.shape) == 3 else 1),)
        assert (imat[t.name] > 0).all()
    imatrix_dat.write_dat(tmp_path / "m.dat", imat, calls)
    back = imatrix_dat.read_dat(tmp_path / "m.dat")
    assert all(np.allclose(back[k], v, rtol=1e-6) for k, v in imat.items())
    request = TypeRequest(quant="q2_k")
    plain = compile_model(model, tmp_path / "a.gguf", "gguf", request, verify=False,
                          progress=False)
    weighted = compile_model(model, tmp_path / "b.gguf", "gguf", request,
                             PassContext(calib=calib), verify=False, progress=False)
    assert (tmp_path / "b.imatrix.dat").exists() and not (tmp_path / "a.imatrix.dat").exists()
    assert plain.report["tensor_bytes"] == weighted.report["tensor_bytes"]
    assert plain.output.read_bytes() != weighted.output.read_bytes()


@pytest.mark.parametrize("qtype", ["q4_k", "iq4_xs", "q5_0"])
def test_threaded_chunks_give_the_bytes_of_one_chunk_at_a_time(qtype):
    """ggml.quantize/dequantize split a tensor of several chunks over threads: the bytes and
    values are those of each chunk's rows quantized (dequantized) on their own, in order."""
    from moecompile.exporters.gguf import ggml as lib

    rng = np.random.default_rng(3)
    n = 512
    step = lib.CHUNK_VALUES // n
    rows = 2 * step + 37  # three chunks, the last one short
    values = rng.standard_normal((rows, n)).astype(np.float32)
    imatrix = rng.random(n).astype(np.float32) + 0.1
    q = ggml(qtype)
    whole = lib.quantize(values, q, imatrix)
    parts = [lib.quantize(values[a:a + step], q, imatrix) for a in range(0, rows, step)]
    assert np.array_equal(whole, np.concatenate(parts))
    back = lib.dequantize(whole, q, values.shape)
    assert np.array_equal(back, np.concatenate([lib.dequantize(p, q, (len(p) // lib.library()
                                                .ggml_row_size(q, n), n)) for p in parts]))
    assert np.sqrt(np.mean((back - values) ** 2)) < 0.2  # rounded, not scrambled
