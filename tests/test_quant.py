"""llama.cpp quantization through llama_model_quantize: exact sizes, per-tensor maps, imatrix."""

import json
from pathlib import Path

import numpy as np
import pytest

from moecompile import frontend
from moecompile.cli import main
from moecompile.compile import compile_gguf
from moecompile.exporters import gguf_quant as gq
from moecompile.passes import imatrix, quantize
from moecompile.passes.calib import build_calib

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "moe-tiny"


@pytest.fixture(scope="module")
def models(tiny_model):
    """Rows of 64 (every k-quant falls back) and of 256 (k-quants apply as such)."""
    return {"h64": frontend.load(tiny_model("qwen2_moe")),
            "h256": frontend.load(tiny_model("mixtral", hidden_size=256, intermediate_size=256))}


@pytest.mark.parametrize("qtype", ["q4_k", "q4_0", "q2_k", "iq4_xs", "q6_k", "q5_k", "q3_k"])
@pytest.mark.parametrize("which", ["h64", "h256"])
def test_predicted_weight_bytes_equal_the_file(models, tmp_path, qtype, which):
    model = models[which]
    types = quantize.uniform(model, qtype)
    result = compile_gguf(model, tmp_path / "q.gguf", quant=types, verify=False, progress=False)
    written = {name: (t, b) for name, _, t, b in gq.read_tensors(result.output)}
    assert result.report["tensor_bytes"] == quantize.weight_bytes(model, types)
    for s in quantize.slots(model):
        want = gq.effective_type(types[s.name], s.shape) if s.name in types else gq.Q.F32
        assert written[s.name][0] == want, s.name
    if which == "h256":  # no fallback: the asked type itself
        assert written["blk.0.ffn_down_exps.weight"][0] == gq.parse_type(qtype)


def test_quant_map_applies_the_first_matching_rule(models, tmp_path):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({r"ffn_down_exps": "q6_k", r"exps": "q4_k", r".": "q8_0"}))
    out = tmp_path / "m.gguf"
    assert main([models["h256"].source, "-o", str(out), "--quant-map", str(mapping),
                 "--no-verify", "--quiet"]) == 0
    types = {name: t.name for name, _, t, _ in gq.read_tensors(out)}
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
    imat, calls = imatrix.collect(model, calib)
    for s in quantize.slots(model):
        if s.quantizable:
            # one value per input column, per expert for stacked expert tensors
            assert imat[s.name].shape == (s.shape[-1] * (len(s.parts) if len(s.shape) == 3 else 1),)
            assert (imat[s.name] > 0).all()
    imatrix.write_dat(tmp_path / "m.dat", imat, calls)
    back = imatrix.read_dat(tmp_path / "m.dat")
    assert all(np.allclose(back[k], v, rtol=1e-6) for k, v in imat.items())
    types = quantize.uniform(model, "q2_k")
    plain = compile_gguf(model, tmp_path / "a.gguf", quant=types, verify=False, progress=False)
    weighted = compile_gguf(model, tmp_path / "b.gguf", quant=types, imatrix=imat, verify=False,
                            progress=False)
    assert plain.report["tensor_bytes"] == weighted.report["tensor_bytes"]
    assert plain.output.read_bytes() != weighted.output.read_bytes()
