"""The IR: its verifier, its printing, weight types keyed by path."""

import dataclasses

import pytest

from moecompile import frontend, ir
from moecompile.cli import main


def test_verifier_names_the_broken_invariant(tiny_model):
    model = frontend.load(tiny_model("mixtral"))
    block = model.blocks[1]
    bad = dataclasses.replace(block, ffn=dataclasses.replace(block.ffn, top_k=99))
    with pytest.raises(ir.IRError, match="block 1: top_k 99 outside 1..8"):
        ir.verify(dataclasses.replace(model, blocks=(model.blocks[0], bad)))


def test_print_ir(tiny_model, capsys):
    assert main([str(tiny_model("qwen2_moe")), "--print-ir"]) == 0
    out = capsys.readouterr().out
    assert "model qwen2_moe" in out
    assert "moe experts=" in out and "top_k=2" in out and "shared" in out
    assert out.count("block ") == 2


def test_print_ir_shows_the_types_a_target_chose(tiny_model, capsys):
    assert main([str(tiny_model("qwen2_moe")), "--print-ir", "--quant", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "attn heads=4 kv=2 head_dim=16 bias [f32 -> q8_0]" in out
    assert "lm_head 64x64 f32" not in out and "-> q8_0" in out.splitlines()[2]
    assert "pass weight_types: target=gguf, method=uniform, label=q8_0" in out


def test_types_are_keyed_by_path_so_a_tied_head_can_differ(tiny_model):
    model = frontend.load(tiny_model("olmoe", tie_word_embeddings=True))
    assert model.lm_head is model.embed  # one handle at two paths
    typed = model.with_types({"embed": "q8_0", "lm_head": "q6_k"})
    assert ir.verify(typed).types == {"embed": "q8_0", "lm_head": "q6_k"}
    assert model.types == {}  # with_types returns a new model
    header = ir.format_ir(typed).splitlines()[2]
    assert "-> q8_0" in header and "-> q6_k" in header and "(tied)" in header
    with pytest.raises(ir.IRError, match="paths the model does not have"):
        ir.verify(model.with_types({"blocks.9.attn.q": "f32"}))
