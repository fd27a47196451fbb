"""What goes beside an ONNX model: onnxruntime-genai's genai_config.json, the tokenizer files,
and the move of the finished files into place (data file first, then the model that points to
it, then the side files), so OUT only ever names complete files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from moecompile import ir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")


def move_into_place(tmp: Path, staged: Path, data: Path | None, final: Path) -> list[Path]:
    """Data file first, then the model that points to it, then the side files."""
    moved = []
    if data is not None:
        target = final.with_name(final.name + ".data")
        _rewrite_location(staged, data.name, target.name)
        os.replace(data, target)
        moved.append(target)
    else:
        final.with_name(final.name + ".data").unlink(missing_ok=True)  # a stale one from before
    os.replace(staged, final)
    moved.append(final)
    for side in sorted(tmp.iterdir()):
        os.replace(side, final.parent / side.name)
        moved.append(final.parent / side.name)
    return moved


def _rewrite_location(model_path: Path, old: str, new: str) -> None:
    """A failed model is renamed OUT.FAILED.onnx: its external data keeps a matching name."""
    if old == new:
        return
    import onnx

    proto = onnx.load_model(str(model_path), load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(proto, str(model_path))


def write_genai_config(model: ir.Model, path: Path, filename: str) -> None:
    """onnxruntime-genai's description of the decoder: its inputs, outputs and cache layout."""
    attn = model.blocks[0].attn
    tok = model.tokenizer
    eos = tok.eos_id if tok and tok.eos_id is not None else 0
    config = {
        "model": {
            "type": "decoder",
            "bos_token_id": tok.bos_id if tok and tok.bos_id is not None else eos,
            "eos_token_id": eos,
            "pad_token_id": tok.pad_id if tok and tok.pad_id is not None else eos,
            "vocab_size": model.vocab,
            "context_length": model.context_length,
            "decoder": {
                "filename": filename,
                "head_size": attn.head_dim,
                "hidden_size": model.hidden,
                "num_attention_heads": attn.n_heads,
                "num_key_value_heads": attn.n_kv_heads,
                "num_hidden_layers": len(model.blocks),
                # every decode step has a new cache length, and ONNX Runtime keeps a memory
                # pattern per input shape (runtime/onnx_runner.py says what that costs)
                "session_options": {"log_id": "moecompile", "provider_options": [],
                                    "enable_mem_pattern": False},
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        # the graph concatenates past and new keys, so genai must not share one buffer
        "search": {"max_length": model.context_length, "past_present_share_buffer": False,
                   "do_sample": False, "num_beams": 1, "top_k": 1},
    }
    path.write_text(json.dumps(config, indent=2) + "\n")


def copy_tokenizer(model: ir.Model, folder: Path) -> None:
    if model.tokenizer is None:
        return
    for name in TOKENIZER_FILES:
        src = Path(str(model.tokenizer.path)) / name
        if src.exists():
            shutil.copyfile(src, folder / name)
