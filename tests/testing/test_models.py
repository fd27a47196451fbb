"""Quick checks that the tiny-checkpoint builders produce what the other tests rely on."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from moecompile.testing.models import ARCHS, build_tiny_model, safetensors_keys, tiny_config

ROUND_TRIP_TEXTS = [
    "def f(x):\n    return x + 1\n",
    "Numbers 0123456789 and 3.14159, -42!",
    "unicode: café, naïve, Ελληνικά, 日本語, emoji 🙂",
    "  leading spaces\n\n\ttabs and trailing  ",
]


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_builds_and_loads(tiny_model, tokenizer_dir, arch):
    path = tiny_model(arch)
    tok = AutoTokenizer.from_pretrained(path)
    model = _load(path)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tok)
    ids = torch.tensor([tok.encode(ROUND_TRIP_TEXTS[0])])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()
    # "Loud" init: logits spread widely enough that the argmax is meaningful.
    assert logits.std() > 0.1


@pytest.mark.parametrize("arch", ARCHS)
def test_loud_norms_and_biases(tiny_model, arch):
    keys = safetensors_keys(tiny_model(arch))
    state = _load(tiny_model(arch)).state_dict()
    norms = [k for k in keys if k.endswith("norm.weight")]
    assert norms, "expected RMSNorm weights"
    for k in norms:
        assert not torch.allclose(state[k], torch.ones_like(state[k])), k
    biases = [k for k in keys if k.endswith(".bias")]
    assert bool(biases) == (arch == "qwen2_moe")  # only Qwen2 has (qkv) biases
    for k in biases:
        assert state[k].abs().sum() > 0, k


def test_deterministic(tmp_path, tokenizer_dir, tiny_model):
    again = build_tiny_model("olmoe", tmp_path / "again", tokenizer_dir=tokenizer_dir)
    first = _load(tiny_model("olmoe")).state_dict()
    second = _load(again).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    "arch, gate, up, down",
    [
        ("mixtral", "model.layers.1.block_sparse_moe.experts.7.w1.weight", "w3", "w2"),
        ("qwen2_moe", "model.layers.1.mlp.experts.3.gate_proj.weight", "up_proj", "down_proj"),
        ("qwen3_moe", "model.layers.1.mlp.experts.7.gate_proj.weight", "up_proj", "down_proj"),
        ("olmoe", "model.layers.1.mlp.experts.7.gate_proj.weight", "up_proj", "down_proj"),
    ],
)
def test_classic_keys_are_per_expert(tiny_model, arch, gate, up, down):
    keys = safetensors_keys(tiny_model(arch))
    cfg = AutoConfig.from_pretrained(tiny_model(arch))
    d = cfg.hidden_size
    f = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    gate_name = gate.rsplit(".", 2)[-2]
    assert keys[gate] == (f, d)
    assert keys[gate.replace(gate_name, up)] == (f, d)
    assert keys[gate.replace(gate_name, down)] == (d, f)
    assert not any("gate_up_proj" in k for k in keys)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_keys(tiny_model, arch):
    path = tiny_model(arch, fused_experts=True)
    keys = safetensors_keys(path)
    cfg = AutoConfig.from_pretrained(path)
    e, d = cfg.num_experts, cfg.hidden_size
    f = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    for layer in range(cfg.num_hidden_layers):
        assert keys[f"model.layers.{layer}.mlp.experts.gate_up_proj"] == (e, 2 * f, d)
        assert keys[f"model.layers.{layer}.mlp.experts.down_proj"] == (e, d, f)
        assert keys[f"model.layers.{layer}.mlp.gate.weight"] == (e, d)
    assert not any(".experts.0." in k for k in keys)

    # Same weights as the classic checkpoint, only stored differently.
    fused = _load(path).state_dict()
    classic = _load(tiny_model(arch)).state_dict()
    assert all(torch.equal(fused[k], classic[k]) for k in classic)


def test_sharded_writes_index(tiny_model):
    path = tiny_model("qwen2_moe", max_shard_size="200KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert all((path / s).exists() for s in shards)
    assert not (path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(safetensors_keys(path))
    logits = _load(path)(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_tiny_config_shapes():
    cfg = tiny_config("qwen3_moe", 300)
    assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert tiny_config("olmoe", 300).num_key_value_heads == tiny_config("olmoe", 300).num_attention_heads
    assert tiny_config("mixtral", 300, num_hidden_layers=3).num_hidden_layers == 3


def test_tokenizer_round_trip(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.bos_token == tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert len(tok) == 512
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # BPE actually learned merges: common code text compresses below one token per byte.
    assert len(tok.encode(ROUND_TRIP_TEXTS[0])) < len(ROUND_TRIP_TEXTS[0].encode()) / 2


def test_own_tokenizer_is_deterministic(tmp_path, tokenizer_dir):
    """Without a tokenizer_dir the builder trains one in place, identical to the session's."""
    path = build_tiny_model("mixtral", tmp_path / "m", num_hidden_layers=1)
    assert (path / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    assert AutoConfig.from_pretrained(path).num_hidden_layers == 1
