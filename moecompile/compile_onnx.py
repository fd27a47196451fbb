"""The ONNX compile job: IR → model.onnx (+ model.onnx.data) in a temporary folder → verify in
ONNX Runtime → move beside the output with genai_config.json and the tokenizer files → report.

`moe="auto"` tries ONNX Runtime's fused MoE kernels first (the fastest form on ORT ≥ 1.32) and
keeps them only when they verify; otherwise the portable per-expert form is written. As for
GGUF, the output path only ever holds complete files, a failed verification keeps the model
under `OUT.FAILED.onnx`, and an error or Ctrl-C removes the temporary folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from . import ir
from .compile import CompileResult, finish
from .errors import UserError, VerificationError
from .verify import verify_onnx

log = logging.getLogger("moecompile")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")


def compile_onnx(model: ir.Model, out: Path, moe: str = "auto", quant: dict[int, str] | None = None,
                 verify: bool = True, device: str | None = None, progress: bool = True,
                 extra_report: dict | None = None,
                 external_at: int | None = None) -> CompileResult:
    from .exporters import onnx as onnx_export

    ir.verify(model)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    report_path = out.with_suffix(".report.json")
    tries = _lowerings(moe, verify)
    kwargs = {} if external_at is None else {"external_at": external_at}
    attempts: list[dict] = []
    try:
        tmp.mkdir()
        for lowering in tries:
            staged = tmp / out.name
            try:
                result = onnx_export.export(model, staged, moe=lowering, quant=quant,
                                            progress=progress, **kwargs)
            except OSError as exc:
                raise UserError(f"{out}: cannot write ({exc.strerror or exc})") from None
            verification = None
            if verify:
                log.info("verifying %s in onnxruntime against the reference executor (%s MoE)",
                         out.name, lowering)
                try:
                    verification = verify_onnx(model, staged, result.numerics, device=device)
                except VerificationError as exc:
                    if lowering == tries[-1]:
                        raise
                    attempts.append({"moe": lowering, "error": str(exc)})
                    continue
                if not verification.passed and lowering != tries[-1]:
                    attempts.append({"moe": lowering, "verification": verification.to_dict()})
                    continue
            break
        final = out if verification is None or verification.passed else out.with_suffix(".FAILED.onnx")
        _write_genai_config(model, tmp / "genai_config.json", final.name)
        _copy_tokenizer(model, tmp)
        moved = _move_into_place(tmp, staged, result.data_path, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return finish(model, "onnx", final, report_path, {
        "arch": "onnx decoder, MoE " + "/".join(sorted(set(result.lowering.values()))),
        "output": str(final),
        "files": [str(p) for p in moved],
        "passes": list(model.history),
        "moe_lowering": {str(k): v for k, v in result.lowering.items()},
        "rejected_lowerings": attempts,
        "weights": result.quant and {"quantized": result.quant, "block_size": 32} or "f32",
        "tensor_bytes": result.weight_bytes,
        "tensors": result.tensors,
        "file_bytes": sum(p.stat().st_size for p in moved if p.suffix in (".onnx", ".data")),
    }, extra_report, verification)


def _lowerings(moe: str, verify: bool) -> list[str]:
    """The forms to try in order. Unverified, auto takes the fused kernels only where they are
    known to be right: ORT ≥ 1.24 (1.23's CPU QMoE gave wrong 4-bit results)."""
    if moe != "auto":
        return [moe]
    if verify:
        return ["ort", "portable"]
    import onnxruntime

    version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2])
    return ["ort"] if version >= (1, 24) else ["portable"]


def _move_into_place(tmp: Path, staged: Path, data: Path | None, final: Path) -> list[Path]:
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


def _write_genai_config(model: ir.Model, path: Path, filename: str) -> None:
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
                "session_options": {"log_id": "moecompile", "provider_options": []},
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


def _copy_tokenizer(model: ir.Model, folder: Path) -> None:
    if model.tokenizer is None:
        return
    for name in TOKENIZER_FILES:
        src = Path(str(model.tokenizer.path)) / name
        if src.exists():
            shutil.copyfile(src, folder / name)
