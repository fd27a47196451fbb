"""`moecompile verify FILE --against MODEL`: files this project did not write (llama.cpp's own
converter), its own files, wrong files, and bad input: exit 0, 1 and 2."""

from __future__ import annotations

import pytest

from moecompile import frontend
from moecompile.cli import main
from moecompile.exporters.target import TypeRequest
from moecompile.job import compile_model
from moecompile.testing import converter, verify_grid

ARCHS = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


@pytest.fixture(scope="module")
def convert_work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_converter_files_pass(tiny_model, convert_work, tmp_path, capsys, arch,
                                        outtype):
    folder = tiny_model(arch)
    out = tmp_path / f"{arch}-{outtype}.gguf"
    proc = converter.convert(folder, out, outtype, convert_work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(["verify", str(out), "--against", str(folder)]) == 0, capsys.readouterr().out


def test_llama_cpp_converter_silently_wrong_qwen3_fails(tiny_model, convert_work, tmp_path,
                                                        capsys):
    """The converter writes a Qwen3-MoE with norm_topk_prob=false as a qwen3moe file, whose
    graph always renormalises the top-k weights: wrong, and said so."""
    folder = tiny_model("qwen3_moe", norm_topk_prob=False)
    out = tmp_path / "q3.gguf"
    assert converter.convert(folder, out, "f32", convert_work).returncode == 0
    assert main(["verify", str(out), "--against", str(folder)]) == 1
    assert "renormalis" in capsys.readouterr().out


@pytest.mark.parametrize("target,request_", [("gguf", TypeRequest(quant="q4_k")),
                                              ("onnx", TypeRequest(quant="int4"))])
def test_own_file_passes_and_a_wrong_one_fails_saying_where(tiny_model, tmp_path, capsys,
                                                             target, request_):
    folder = tiny_model("mixtral")
    model = frontend.load(folder)
    good = compile_model(model, tmp_path / f"good.{target}", target, request_, verify=False,
                         progress=False).output
    assert main(["verify", str(good), "--against", str(folder)]) == 0
    capsys.readouterr()
    bad = compile_model(verify_grid.experts_swapped(model), tmp_path / f"bad.{target}", target,
                        request_, verify=False, progress=False).output
    assert main(["verify", str(bad), "--against", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    if target == "gguf":  # the tensor that differs is named
        assert "blk.1.ffn_gate_exps" in out or "blk.1.ffn_up_exps" in out, out


def test_bad_input_exits_2(tiny_model, tmp_path, capsys):
    folder = tiny_model("mixtral")
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    (tmp_path / "x.txt").write_text("")
    for args in (["verify", str(tmp_path / "x.txt"), "--against", str(folder)],
                 ["verify", str(tmp_path / "x.onnx"), "--against", str(folder)],
                 ["verify", str(tmp_path / "missing.gguf"), "--against", str(folder)]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
