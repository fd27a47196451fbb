"""The reference executor against transformers' own forward pass, on every supported family."""

import pytest
import torch

from moecompile import frontend
from moecompile.runtime import ReferenceExecutor
from moecompile.testing.models import ARCHS, hf_logits, random_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_transformers(tiny_model, arch):
    folder = tiny_model(arch)
    model = frontend.load(folder)
    ids = random_ids(model.vocab, (2, 24))
    ours = ReferenceExecutor(model, "cpu").logits(ids)
    theirs = hf_logits(folder, ids)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_left_padding_leaves_real_tokens_unchanged(tiny_model, arch):
    """Batched calibration pads on the left; padded rows must equal the unpadded run."""
    model = frontend.load(tiny_model(arch))
    ex = ReferenceExecutor(model, "cpu")
    ids = random_ids(model.vocab, (1, 10), seed=1)
    alone = ex.logits(ids)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    batched = ex.logits(padded, mask)[:, 5:]
    assert (batched - alone).abs().max().item() <= 1e-4


def test_bf16_sharded_source_matches_transformers(tiny_model):
    folder = tiny_model("qwen2_moe", dtype=torch.bfloat16, max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").exists()
    model = frontend.load(folder)
    assert model.blocks[0].attn.q.dtype == "bf16"
    ids = random_ids(model.vocab, (1, 16))
    ours = ReferenceExecutor(model, "cpu").logits(ids)
    assert (ours - hf_logits(folder, ids)).abs().max().item() <= 1e-4
