"""Frontend: lazy reading, both expert layouts, each family's structure."""

import pytest
import torch

from moecompile import frontend, ir
from moecompile.testing.models import ARCHS


def test_load_reads_no_tensor_data(tiny_model, monkeypatch):
    from moecompile.frontend import checkpoint

    opened = []
    real_safe_open = checkpoint.safe_open
    monkeypatch.setattr(checkpoint, "safe_open",
                        lambda *a, **k: opened.append(a[0]) or real_safe_open(*a, **k))
    model = frontend.load(tiny_model("mixtral"))
    assert opened == [], "building the IR must not open tensor data"
    model.blocks[0].ffn.experts[3].down.value()
    assert len(opened) == 1


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_fused_and_classic_layouts_give_the_same_experts(tiny_model, arch):
    classic = frontend.load(tiny_model(arch))
    fused = frontend.load(tiny_model(arch, fused_experts=True))
    assert "gate_up_proj" in fused.blocks[0].ffn.experts[0].gate.recipe.describe()
    for bc, bf in zip(classic.blocks, fused.blocks):
        for ec, ef in zip(bc.ffn.experts, bf.ffn.experts):
            for name in ("gate", "up", "down"):
                assert torch.equal(getattr(ec, name).value(), getattr(ef, name).value())


@pytest.mark.parametrize("arch", ARCHS)
def test_ir_structure_mirrors_the_family(tiny_model, arch):
    model = frontend.load(tiny_model(arch))
    moe = model.blocks[0].ffn
    assert isinstance(moe, ir.MoE) and moe.n_experts >= 4 and moe.top_k == 2
    assert (moe.shared is not None) == (arch == "qwen2_moe")
    assert model.blocks[0].attn.qk_norm == {"qwen3_moe": "head", "olmoe": "full"}.get(arch, "none")
    assert moe.norm_topk == (arch in ("mixtral", "qwen3_moe"))
