"""What a GGUF holds, checked against the checkpoint it claims to compute: any file, also one
moecompile did not write (llama.cpp's converter, a download).

Running the file against the reference on the file's own numerics catches a graph that
computes differently (routing, norms, rope, metadata), but not wrong *values*: a file whose
experts are swapped computes, on its own numbers, exactly what it holds. So two more checks:

- `metadata_mismatches`: the hyper-parameters llama.cpp reads (norm epsilon, rope base,
  heads, experts, top-k, ...) against the checkpoint's;
- `tensor_mismatches`: each tensor's values (each expert's, for stacked ones) against the
  checkpoint's, allowed as far from them as its own type allows: the error of re-rounding the
  checkpoint's values to that type, sampled rows at a time (every type rounds rows
  independently), so memory stays one expert's rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from moecompile import ir

from . import ggml
from .reader import tensor_table
from .types import Q, roundtrip
from .writer import is_stacked

SAMPLED_ROWS = 64  # rows of each tensor (of each expert) compared
SLACK = 2.0  # a file may be this many times as far from the checkpoint as its type's rounding
FLOOR = 1e-6  # relative error below which values are equal (exact types)


def read_metadata(path: Path) -> tuple[str, dict]:
    """(arch, {key: value}) of a GGUF's key-value section (arrays left out)."""
    reader = gguf.GGUFReader(str(path))
    fields = {}
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or len(f.data) > 1:
            continue
        fields[f.name] = f.contents()
    return str(fields.get("general.architecture", "")), fields


def metadata_mismatches(fields: dict, arch: str, model: ir.Model) -> list[str]:
    """Keys llama.cpp reads whose values differ from what the checkpoint says."""
    a, moe = model.blocks[0].attn, next(b.ffn for b in model.blocks if isinstance(b.ffn, ir.MoE))
    want = {
        "block_count": len(model.blocks), "embedding_length": model.hidden,
        "attention.head_count": a.n_heads, "attention.head_count_kv": a.n_kv_heads,
        "attention.layer_norm_rms_epsilon": model.norm_eps, "rope.freq_base": model.rope.theta,
        "rope.dimension_count": model.rope.dim, "expert_count": moe.n_experts,
        "expert_used_count": moe.top_k,
    }
    if f"{arch}.expert_weights_norm" in fields:  # archs where the file chooses the routing
        want["expert_weights_norm"] = moe.norm_topk
    out = []
    for key, value in want.items():
        got = fields.get(f"{arch}.{key}")
        if got is None:
            continue
        if isinstance(value, float) and abs(float(got) - value) <= 1e-6 * max(1.0, abs(value)):
            continue
        if got != value:
            out.append(f"{arch}.{key} is {got}, the checkpoint's {value}")
    return out


def tensor_mismatches(path: Path, planned: list) -> list[str]:
    """Tensors (and experts) further from the checkpoint than their type's own rounding, worst
    first; `planned` (writer.plan) names the IR tensors each GGUF tensor holds."""
    table = tensor_table(Path(path))
    out = []
    with open(path, "rb") as f:
        for p in planned:
            if p.name not in table:
                out.append((float("inf"), f"{p.name}: missing from the file"))
                continue
            offset, nbytes, qtype, shape = table[p.name]
            part_shape = p.part_shape
            if tuple(shape) != tuple(p.shape):
                out.append((float("inf"), f"{p.name}: shape {shape}, the checkpoint's {p.shape}"))
                continue
            part_bytes = nbytes // len(p.paths)
            for index, (ir_path, part) in enumerate(zip(p.paths, p.parts)):
                err, own = _part_error(f, offset + index * part_bytes, part_bytes, qtype,
                                       part_shape, part, p.transform)
                if err > SLACK * own + FLOOR:
                    where = f"{p.name} (expert {index})" if is_stacked(p.name) else p.name
                    out.append((err, f"{where}: relative error {err:.3g} to the checkpoint's "
                                     f"{ir_path}, its {qtype.name} rounding alone gives "
                                     f"{own:.3g}"))
    return [text for _, text in sorted(out, key=lambda e: -e[0])]


def _part_error(f, offset: int, nbytes: int, qtype: Q, shape, part: ir.Tensor,
                transform) -> tuple[float, float]:
    """(relative error of the file's values, of re-rounding the source) on sampled rows."""
    rows = shape[0] if len(shape) > 1 else 1
    row_bytes = nbytes // rows
    source = part.value().to(torch.float32)
    if transform is not None:
        source = transform(source)
    source = source.reshape(rows, -1).numpy()
    picks = np.unique(np.linspace(0, rows - 1, min(SAMPLED_ROWS, rows)).round().astype(int))
    file_rows = np.stack([ggml.dequantize(np.frombuffer(os.pread(f.fileno(), row_bytes,
                                                                 offset + r * row_bytes),
                                                        dtype=np.uint8), int(qtype),
                                          (source.shape[1],)) for r in picks])
    src = source[picks]
    norm = float(np.linalg.norm(src)) or 1.0
    err = float(np.linalg.norm(file_rows - src)) / norm
    own = float(np.linalg.norm(roundtrip(src, qtype) - src)) / norm
    return err, own
