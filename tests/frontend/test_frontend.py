"""Frontend: lazy reading, both expert layouts, each family's structure."""

import pytest
import torch

from moecompile import frontend, ir
from moecompile.testing.models import ARCHS


def test_load_reads_no_tensor_data(tiny_model, monkeypatch):
    from moecompile.frontend import checkpoint

    read = []
    for name in ("safe_open", "_read_part"):  # the two ways Checkpoint.read reaches data
        real = getattr(checkpoint, name)
        monkeypatch.setattr(checkpoint, name,
                            lambda *a, real=real, **k: read.append(a[0]) or real(*a, **k))
    model = frontend.load(tiny_model("mixtral"))
    assert read == [], "building the IR must not read tensor data"
    model.blocks[0].ffn.experts[3].down.value()
    assert len(read) == 1


def test_reads_give_what_safetensors_gives(tmp_path):
    """Whole tensors of every dtype, a leading-index part, a scalar, an empty tensor and a
    sliced part (safetensors' own reader) equal what safetensors wrote; a read tensor is the
    caller's own."""
    from safetensors.torch import save_file

    from moecompile.frontend.checkpoint import open_checkpoint

    (tmp_path / "config.json").write_text("{}")
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 4, 5, generator=g).to(torch.bfloat16),
               "b": torch.randn(7, generator=g), "c": torch.randn(2, 3, generator=g).half(),
               "s": torch.tensor(3.0), "e": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ck = open_checkpoint(tmp_path)
    for key, value in tensors.items():
        assert ck.read(key).dtype == value.dtype and torch.equal(ck.read(key), value), key
    for index in [(1,), (2, 3), (-1,), (slice(0, 2),), (1, slice(1, 3))]:
        assert torch.equal(ck.read("a", index), tensors["a"][index]), index
    mine = ck.read("b")
    mine += 1
    assert torch.equal(ck.read("b"), tensors["b"])


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
