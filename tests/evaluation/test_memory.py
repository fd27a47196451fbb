"""Refusing an HF folder that would not fit in memory in transformers, before loading it."""

from __future__ import annotations

import pytest
import torch

from moecompile.errors import UserError
from moecompile.evaluation.memory import (available_memory, check_hf_fits, hf_memory_needed,
                                          parameter_count)


def test_parameter_count_from_headers_matches_transformers(tiny_model):
    """A sharded bf16 checkpoint: the count read from the safetensors headers is the number of
    parameters transformers loads, and they are loaded as float32 (4 bytes each)."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model("mixtral", dtype=torch.bfloat16, max_shard_size="200KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    assert parameter_count(folder) == params
    need = hf_memory_needed(folder, batch=8, tokens=512)
    assert need["weights"] == 4 * params and need["total"] > need["weights"]


def test_refusal_names_what_it_needs_and_what_there_is(qwen3):
    need = check_hf_fits(qwen3, 8, 512, limit=1 << 40)
    with pytest.raises(UserError) as err:
        check_hf_fits(qwen3, 8, 512, limit=need["total"] - 1)
    message = str(err.value)
    assert "needs about" in message and "is available" in message and ".gguf/.onnx" in message
    assert available_memory() > 0  # Linux: /proc/meminfo


def test_cli_refuses_with_exit_2(qwen3, compiled, capsys, eval_main):
    assert eval_main([str(qwen3), "--tasks", "add", "--n", "2", "--max-memory", "1MB",
                      "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eval: error: {qwen3}: evaluating it in transformers needs about")
    # a compiled file is not held to it: it runs in its runtime from a memory map
    assert eval_main([str(compiled["gguf"]), "--tasks", "add", "--n", "2", "--max-memory", "1MB",
                      "--quiet"]) == 0
