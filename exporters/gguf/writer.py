"""IR → GGUF for llama.cpp, streamed tensor by tensor.

What this module knows is llama.cpp's file format (see shared/research/gguf.md): the metadata
keys and their exact types, tensor names and layouts, and the q/k permutation of the `llama`
arch. Which IR llama.cpp can run faithfully is arch.py's question; each tensor's type is the
IR's (`Model.types`, chosen by the target).

Streaming: the header and tensor table are written first from shapes alone; then each tensor is
produced from its lazy sources, converted and written, one at a time. Stacked expert tensors are
written expert by expert, so peak memory is about one expert slice, not one layer or the model.
The file is written under a temporary name and renamed by the caller once it is verified.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
import torch
from tqdm import tqdm

from moecompile import ir

from . import vocab as gguf_vocab
from .types import FILE_TYPES, Q, encode, file_type, ggml, name_of

# ------------------------------------------------------------------------------ what is written


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, type, numpy shape and how to produce its rows."""

    name: str
    qtype: Q
    shape: tuple[int, ...]
    parts: tuple[ir.Tensor, ...]  # a layer's experts are stacked along a new leading axis
    paths: tuple[str, ...]  # the IR paths of the parts
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    importance: np.ndarray | None = None  # per input column, the parts' vectors concatenated
    rounded: object = None  # a RoundedStore (rounded.py) whose kept bytes are copied

    @property
    def part_shape(self) -> tuple[int, ...]:
        """The shape of one part: a stacked tensor's leading axis counts its experts, one
        expert included (a model pruned to one expert per layer)."""
        return tuple(self.shape[1:]) if is_stacked(self.name) else tuple(self.shape)

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.shape))
        return n // block * size

    def pieces(self) -> Iterator[np.ndarray]:
        """The tensor's bytes in writing order: expert by expert, and within a part in chunks
        of rows (every GGUF type quantizes row-wise), so conversion temporaries stay small."""
        for index, (path, part) in enumerate(zip(self.paths, self.parts)):
            kept = None if self.rounded is None else self.rounded.stored(path, int(self.qtype))
            if kept is not None:
                yield self._reordered(kept, part.shape)
                continue
            value = part.value()
            if self.transform is not None:
                value = self.transform(value)
            rows = value.reshape(-1, value.shape[-1])
            n = rows.shape[-1]
            imatrix = (None if self.importance is None
                       else self.importance[index * n:(index + 1) * n])
            step = max(1, CHUNK_ELEMENTS // n)
            for start in range(0, rows.shape[0], step):
                yield encode(rows[start:start + step], self.qtype, imatrix)


    def _reordered(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A part's kept bytes (rounded in the IR's row order) in the file's: every GGUF type
        encodes each row on its own, so the transform's row permutation moves whole rows of
        bytes."""
        if self.transform is None:
            return data
        rows = math.prod(shape[:-1])
        order = self.transform(torch.arange(rows).reshape(rows, 1))[:, 0].numpy()
        return data.reshape(rows, -1)[order].reshape(-1)


CHUNK_ELEMENTS = 1 << 22  # elements converted at a time (16 MiB as float32)


class _StreamedTensor:
    """Duck-types the numpy API GGUFWriter.write_tensor_data uses (nbytes, tofile)."""

    def __init__(self, planned: PlannedTensor):
        self.planned = planned
        self.nbytes = planned.nbytes

    def tofile(self, fout) -> None:
        written = 0
        for piece in self.planned.pieces():
            piece.tofile(fout)
            written += piece.nbytes
        if written != self.nbytes:
            raise AssertionError(f"{self.planned.name}: wrote {written} bytes, planned {self.nbytes}")


# ------------------------------------------------------------------------------ planning


def _permute_rows(n_heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """HF rotate_half (NEOX) q/k rows → the interleaved pairs of llama.cpp's `llama` rope."""

    def permute(w: torch.Tensor) -> torch.Tensor:
        rest = w.shape[1:]
        return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest)
                .swapaxes(1, 2).reshape(w.shape))

    return permute


def is_stacked(name: str) -> bool:
    """Whether a GGUF tensor holds a layer's experts stacked along a new leading axis."""
    return name.endswith("_exps.weight")


def layout(model: ir.Model, arch: str) -> list[tuple[str, tuple[str, ...], Callable | None]]:
    """Every GGUF tensor in writing order: (GGUF name, the IR paths it holds — a layer's experts
    stacked along a new leading axis —, the row transform applied on writing)."""
    out: list[tuple[str, tuple[str, ...], Callable | None]] = []
    add = lambda name, paths, transform=None: out.append((name, tuple(paths), transform))
    add("token_embd.weight", ["embed"])
    for i, b in enumerate(model.blocks):
        p, q, a, f = f"blk.{i}.", f"blocks.{i}.", b.attn, b.ffn
        permute_q = _permute_rows(a.n_heads) if arch == "llama" else None
        permute_k = _permute_rows(a.n_kv_heads) if arch == "llama" else None
        add(p + "attn_norm.weight", [q + "attn_norm"])
        add(p + "attn_q.weight", [q + "attn.q"], permute_q)
        add(p + "attn_k.weight", [q + "attn.k"], permute_k)
        add(p + "attn_v.weight", [q + "attn.v"])
        add(p + "attn_output.weight", [q + "attn.o"])
        for name, bias, perm in (("attn_q", "q_bias", permute_q), ("attn_k", "k_bias", permute_k),
                                 ("attn_v", "v_bias", None)):
            if getattr(a, bias) is not None:
                add(p + name + ".bias", [q + "attn." + bias], perm)
        if a.qk_norm != "none":
            add(p + "attn_q_norm.weight", [q + "attn.q_norm"])
            add(p + "attn_k_norm.weight", [q + "attn.k_norm"])
        add(p + "ffn_norm.weight", [q + "ffn_norm"])
        add(p + "ffn_gate_inp.weight", [q + "ffn.router.weight"])
        for proj in ("gate", "up", "down"):
            add(p + f"ffn_{proj}_exps.weight",
                [f"{q}ffn.experts.{e}.{proj}" for e in range(f.n_experts)])
        if f.shared is not None:
            add(p + "ffn_gate_inp_shexp.weight", [q + "ffn.shared.gate"])
            for proj in ("gate", "up", "down"):
                add(p + f"ffn_{proj}_shexp.weight", [f"{q}ffn.shared.mlp.{proj}"])
    add("output_norm.weight", ["final_norm"])
    add("output.weight", ["lm_head"])  # always written: qwen2moe/olmoe have no tied fallback
    return out


def plan(model: ir.Model, arch: str, f32: bool = False) -> list[PlannedTensor]:
    """Every GGUF tensor in writing order with its type: the IR's (`Model.types`), or F32 for
    every tensor (`f32`: a placeholder where only the layout matters)."""
    tensors = model.tensor_map()
    out = []
    for name, paths, transform in layout(model, arch):
        parts = tuple(tensors[p] for p in paths)
        stacked = is_stacked(name)
        shape = (len(parts), *parts[0].shape) if stacked else tuple(parts[0].shape)
        kinds = {"f32" if f32 else model.types[p] for p in paths}
        if len(kinds) > 1:
            raise AssertionError(f"{name}: its experts have different types {sorted(kinds)}")
        out.append(PlannedTensor(name, ggml(kinds.pop()), shape, parts, paths, transform))
    return out


# ------------------------------------------------------------------------------ metadata


def _add_hparams(w: gguf.GGUFWriter, model: ir.Model, arch: str, ftype: str) -> None:
    b0 = model.blocks[0]
    a, f = b0.attn, b0.ffn
    ffn = f.experts[0].gate.shape[0]
    w.add_name(Path(model.source).name or model.family)
    w.add_context_length(model.context_length)
    w.add_embedding_length(model.hidden)
    w.add_block_count(len(model.blocks))
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_layer_norm_rms_eps(model.norm_eps)
    w.add_rope_freq_base(model.rope.theta)
    w.add_rope_dimension_count(model.rope.dim)
    w.add_expert_count(f.n_experts)
    w.add_expert_used_count(f.top_k)
    if a.n_heads * a.head_dim != model.hidden or arch == "qwen3moe":
        w.add_key_length(a.head_dim)
        w.add_value_length(a.head_dim)
    if arch in ("qwen2moe", "qwen3moe"):
        w.add_expert_feed_forward_length(ffn)
    if f.shared is not None:
        w.add_expert_shared_feed_forward_length(f.shared.mlp.gate.shape[0])
    w.add_feed_forward_length(f.shared.mlp.gate.shape[0] if f.shared is not None else ffn)
    w.add_file_type(FILE_TYPES[ftype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string("moecompile.source", model.source)
    w.add_string("moecompile.family", model.family)
    if model.history:  # without wall-clock times, so the same command writes the same bytes
        w.add_string("moecompile.history", json.dumps(
            [{k: v for k, v in entry.items() if k != "seconds"} for entry in model.history]))


# ------------------------------------------------------------------------------ writing


@dataclass
class ExportResult:
    path: Path
    arch: str
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def export(model: ir.Model, path: Path, arch: str,
           importance: dict[str, np.ndarray] | None = None, progress: bool = True,
           rounded=None) -> ExportResult:
    """Write `model` as GGUF at `path` (the caller picks a temporary name and renames), each
    tensor in its IR type, quantized with its `importance` vector (GGUF name -> per-column
    importance, experts concatenated) where it has one, or copied from `rounded` (a
    RoundedStore that rounded it with the same vector) where that kept it."""
    planned = plan(model, arch)
    for t in planned:
        t.importance = (importance or {}).get(t.name)
        t.rounded = rounded
    label = file_type([(name_of(t.qtype), t.nbytes) for t in planned])
    vocab = gguf_vocab.read_vocab(model.tokenizer, model.vocab)
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        _add_hparams(writer, model, arch, label)
        gguf_vocab.add_to_writer(writer, vocab, model.tokenizer, arch, model.vocab)
        for t in planned:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file(path=Path(path))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(t.nbytes for t in planned)
        with tqdm(total=total, unit="B", unit_scale=True, desc="writing GGUF",
                  disable=not progress) as bar:
            for t in planned:
                writer.write_tensor_data(_StreamedTensor(t))
                bar.update(t.nbytes)
    finally:
        writer.close()
    return ExportResult(Path(path), arch, planned)
