"""IR → GGUF for llama.cpp, streamed tensor by tensor.

What this module knows is llama.cpp's side of the contract (see shared/research/gguf.md):
the arch name per family, the metadata keys and their exact types, tensor names and layouts,
the q/k permutation of the `llama` arch, and — most importantly — which semantics each arch's
fixed graph computes. An IR the target graph would compute differently (e.g. Qwen3-MoE without
top-k renormalisation) is refused with the reason, never written.

Streaming: the header and tensor table are written first from shapes alone; then each tensor is
produced from its lazy sources, converted and written, one at a time. Stacked expert tensors are
written expert by expert, so peak memory is about one expert slice, not one layer or the model.
The file is written under a temporary name and renamed by the caller once it is verified.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
import torch
from tqdm import tqdm

from moecompile import ir
from moecompile.errors import UserError

from . import gguf_vocab

Q = gguf.GGMLQuantizationType
DTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

# family → (llama.cpp arch, q/k norm it computes, renormalises top-k, shared expert with gate)
_TARGETS = {
    "mixtral": ("llama", "none", True, False),
    "qwen2_moe": ("qwen2moe", "none", False, True),
    "qwen3_moe": ("qwen3moe", "head", True, False),
    "olmoe": ("olmoe", "full", False, False),
}
MAX_EXPERTS = 256  # LLAMA_MAX_EXPERTS of older llama.cpp builds; 0.3.36 allows 1024


# ------------------------------------------------------------------------------ what is written


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, type, numpy shape and how to produce its rows."""

    name: str
    qtype: Q
    shape: tuple[int, ...]
    parts: tuple[ir.Tensor, ...]  # stacked along a new leading axis when more than one
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.shape))
        return n // block * size

    def pieces(self) -> Iterator[np.ndarray]:
        """The tensor's bytes in writing order: expert by expert, and within a part in chunks
        of rows (every GGUF type quantizes row-wise), so conversion temporaries stay small."""
        for part in self.parts:
            value = part.value()
            if self.transform is not None:
                value = self.transform(value)
            rows = value.reshape(-1, value.shape[-1])
            step = max(1, CHUNK_ELEMENTS // rows.shape[-1])
            for start in range(0, rows.shape[0], step):
                yield encode(rows[start:start + step], self.qtype)


CHUNK_ELEMENTS = 1 << 22  # elements converted at a time (16 MiB as float32)


def encode(value: torch.Tensor, qtype: Q) -> np.ndarray:
    """Values → the bytes of `qtype` as llama.cpp reads them (gguf-py's reference encoders).
    A source already in the target's 16-bit type is passed through bit for bit."""
    if qtype == Q.BF16 and value.dtype == torch.bfloat16:
        return value.contiguous().view(torch.int16).numpy().view(np.uint8)
    if qtype == Q.F16 and value.dtype == torch.float16:
        return value.contiguous().numpy()
    array = value.to(torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def roundtrip(array: np.ndarray, qtype: Q) -> np.ndarray:
    """The float32 values llama.cpp will see after storing `array` as `qtype`."""
    if qtype == Q.F32:
        return np.asarray(array, dtype=np.float32)
    encoded = encode(torch.from_numpy(np.ascontiguousarray(array)), qtype)
    return gguf.quants.dequantize(encoded, qtype).reshape(array.shape)


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


def choose_type(name: str, shape: tuple[int, ...], dtype: str) -> Q:
    """llama.cpp's conventions: 1-D tensors and routers stay F32; rows that do not fit the
    block size fall back to F16."""
    if len(shape) == 1 or ".ffn_gate_inp" in name:
        return Q.F32
    qtype = DTYPES[dtype]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return Q.F16
    return qtype


# ------------------------------------------------------------------------------ refusal rules


def check_exportable(model: ir.Model) -> str:
    """Return llama.cpp's arch name for `model`, or raise UserError saying why it can't be exact."""
    if model.family not in _TARGETS:
        raise UserError(f"family '{model.family}' has no GGUF mapping")
    arch, qk_norm, renorm, shared = _TARGETS[model.family]
    moes = [b.ffn for b in model.blocks]
    dropped = [i for i, f in enumerate(moes) if f is None]
    if dropped:
        raise UserError(f"layer(s) {dropped} have no FFN (their MoE sublayer was dropped): "
                        f"llama.cpp's {arch} graph has no form for a block without one; use "
                        "--drop-blocks for GGUF, or a target that can express it (ONNX)")
    dense = [i for i, f in enumerate(moes) if not isinstance(f, ir.MoE)]
    if dense:
        raise UserError(f"GGUF/llama.cpp's {arch} graph makes every layer MoE, but layer(s) "
                        f"{dense} are dense (or had their MoE sublayer removed)")
    counts = {f.n_experts for f in moes}
    topks = {f.top_k for f in moes}
    if len(counts) > 1 or len(topks) > 1:
        raise UserError(f"llama.cpp needs one expert count and top-k for the whole model; "
                        f"layers have experts {sorted(counts)} and top-k {sorted(topks)}")
    if max(counts) > MAX_EXPERTS:
        raise UserError(f"{max(counts)} experts exceed llama.cpp's limit of {MAX_EXPERTS}")
    for i, block in enumerate(model.blocks):
        f, a = block.ffn, block.attn
        if f.norm_topk != renorm:
            raise UserError(
                f"llama.cpp's {arch} graph {'always' if renorm else 'never'} renormalises the "
                f"top-k routing weights, but this model has norm_topk_prob="
                f"{str(f.norm_topk).lower()} (layer {i}); the export would compute different "
                "logits, so it is refused")
        if f.scoring != "softmax":
            raise UserError(f"layer {i}: '{f.scoring}' routing is not expressible in {arch}")
        if f.router_map is not None:
            raise UserError(f"layer {i}: the router maps expert probabilities through a "
                            f"continuous matrix (EEP's exact router), which llama.cpp's {arch} "
                            "graph cannot compute; prune for GGUF with a one-hot router")
        if (f.shared is not None) != shared or (shared and f.shared.gate is None):
            raise UserError(f"layer {i}: llama.cpp's {arch} graph "
                            f"{'needs a sigmoid-gated' if shared else 'has no'} shared expert")
        if a.qk_norm != qk_norm:
            raise UserError(f"layer {i}: q/k norm '{a.qk_norm}' differs from {arch}'s '{qk_norm}'")
        if a.clip_qkv is not None:
            raise UserError("clip_qkv is ignored by llama.cpp; the export would be inexact")
        if arch in ("qwen2moe", "olmoe") and a.n_heads * a.head_dim != model.hidden:
            raise UserError(f"llama.cpp's {arch} needs heads*head_dim == hidden")
        if arch == "olmoe" and a.n_kv_heads != a.n_heads:
            raise UserError("llama.cpp's olmoe graph sizes the k-norm by the full hidden size, "
                            "so grouped-query attention (kv heads < heads) cannot be exported")
        if arch == "llama" and model.rope.dim != a.head_dim:
            raise UserError("llama arch needs rope dimension == head_dim")
        if arch == "qwen2moe" and None in (a.q_bias, a.k_bias, a.v_bias):
            raise UserError(f"layer {i}: llama.cpp's qwen2moe (older builds) requires q/k/v biases")
    return arch


# ------------------------------------------------------------------------------ planning


def _permute_rows(n_heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """HF rotate_half (NEOX) q/k rows → the interleaved pairs of llama.cpp's `llama` rope."""

    def permute(w: torch.Tensor) -> torch.Tensor:
        rest = w.shape[1:]
        return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest)
                .swapaxes(1, 2).reshape(w.shape))

    return permute


def plan(model: ir.Model, dtype: str, arch: str) -> list[PlannedTensor]:
    """Every GGUF tensor in writing order, with its type — computed from shapes alone."""
    out: list[PlannedTensor] = []

    def add(name: str, t: ir.Tensor | list[ir.Tensor], transform=None):
        parts = tuple(t) if isinstance(t, list) else (t,)
        shape = (len(parts), *parts[0].shape) if isinstance(t, list) else tuple(t.shape)
        out.append(PlannedTensor(name, choose_type(name, shape, dtype), shape, parts, transform))

    add("token_embd.weight", model.embed)
    for i, b in enumerate(model.blocks):
        p, a, f = f"blk.{i}.", b.attn, b.ffn
        permute_q = _permute_rows(a.n_heads) if arch == "llama" else None
        permute_k = _permute_rows(a.n_kv_heads) if arch == "llama" else None
        add(p + "attn_norm.weight", b.attn_norm)
        add(p + "attn_q.weight", a.q, permute_q)
        add(p + "attn_k.weight", a.k, permute_k)
        add(p + "attn_v.weight", a.v)
        add(p + "attn_output.weight", a.o)
        for name, bias, perm in (("attn_q", a.q_bias, permute_q), ("attn_k", a.k_bias, permute_k),
                                 ("attn_v", a.v_bias, None)):
            if bias is not None:
                add(p + name + ".bias", bias, perm)
        if a.qk_norm != "none":
            add(p + "attn_q_norm.weight", a.q_norm)
            add(p + "attn_k_norm.weight", a.k_norm)
        add(p + "ffn_norm.weight", b.ffn_norm)
        add(p + "ffn_gate_inp.weight", f.router.weight)
        add(p + "ffn_gate_exps.weight", [e.gate for e in f.experts])
        add(p + "ffn_up_exps.weight", [e.up for e in f.experts])
        add(p + "ffn_down_exps.weight", [e.down for e in f.experts])
        if f.shared is not None:
            add(p + "ffn_gate_inp_shexp.weight", f.shared.gate)
            add(p + "ffn_gate_shexp.weight", f.shared.mlp.gate)
            add(p + "ffn_up_shexp.weight", f.shared.mlp.up)
            add(p + "ffn_down_shexp.weight", f.shared.mlp.down)
    add("output_norm.weight", model.final_norm)
    add("output.weight", model.lm_head)  # always written: qwen2moe/olmoe have no tied fallback
    return out


# ------------------------------------------------------------------------------ metadata


def _add_hparams(w: gguf.GGUFWriter, model: ir.Model, arch: str, dtype: str) -> None:
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
    w.add_file_type(FILE_TYPES[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string("moecompile.source", model.source)
    w.add_string("moecompile.family", model.family)
    if model.history:
        w.add_string("moecompile.history", json.dumps(list(model.history)))


# ------------------------------------------------------------------------------ writing


@dataclass
class ExportResult:
    path: Path
    arch: str
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def export(model: ir.Model, path: Path, dtype: str = "f32", progress: bool = True) -> ExportResult:
    """Write `model` as GGUF at `path` (the caller picks a temporary name and renames)."""
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    arch = check_exportable(model)
    planned = plan(model, dtype, arch)
    vocab = gguf_vocab.read_vocab(model.tokenizer, model.vocab)
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        _add_hparams(writer, model, arch, dtype)
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


# matmul input type of llama.cpp's CPU kernels per weight type (ggml type_traits vec_dot_type)
_KERNEL_INPUT = {Q.Q8_0: Q.Q8_0, Q.Q4_0: Q.Q8_0, Q.Q5_0: Q.Q8_0, Q.Q4_1: Q.Q8_0, Q.Q5_1: Q.Q8_0,
                 Q.IQ4_NL: Q.Q8_0, Q.Q2_K: Q.Q8_K, Q.Q3_K: Q.Q8_K, Q.Q4_K: Q.Q8_K,
                 Q.Q5_K: Q.Q8_K, Q.Q6_K: Q.Q8_K, Q.IQ4_XS: Q.Q8_K, Q.F16: Q.F16, Q.BF16: Q.BF16}


def round_q8_k(x: np.ndarray) -> np.ndarray:
    """Values after ggml's quantize_row_q8_K_ref (blocks of 256, scale from the value of largest
    magnitude, round half to even). Q4_0/Q5_x inputs use Q8_0/Q8_1, whose values equal Q8_0's."""
    shape = x.shape
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 256)
    pick = np.abs(blocks).argmax(axis=1)
    peak = blocks[np.arange(len(blocks)), pick]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(peak == 0, 0, np.float32(-127.0) / peak).astype(np.float32)
        q = np.minimum(np.rint(iscale[:, None] * blocks), 127)
        out = np.where(peak[:, None] == 0, 0, q * (np.float32(1.0) / iscale)[:, None])
    return out.astype(np.float32).reshape(shape)


def kernel_input(weight_type: Q | None, x: torch.Tensor) -> torch.Tensor:
    """`x` rounded the way llama.cpp's CPU kernel for a `weight_type` matmul rounds its input."""
    kernel = _KERNEL_INPUT.get(weight_type)
    if kernel is None or x.numel() == 0:
        return x
    array = x.detach().cpu().numpy()
    rounded = round_q8_k(array) if kernel == Q.Q8_K else roundtrip(array, kernel)
    return torch.from_numpy(rounded).to(x.device)


class StoredNumerics:
    """The numbers llama.cpp computes with for an export: weights as stored, and matmul inputs
    rounded as its CPU kernels round them. Plugged into the reference executor, it lets
    verification hold a rounded export to a tight tolerance instead of a loose one."""

    def __init__(self, planned: list[PlannedTensor]):
        self.types = {id(part): t.qtype for t in planned for part in t.parts}
        self.exact = all(t.qtype == Q.F32 for t in planned)

    def weight(self, t: ir.Tensor) -> torch.Tensor:
        value = t.value().to(torch.float32)
        qtype = self.types.get(id(t), Q.F32)
        return value if qtype == Q.F32 else torch.from_numpy(roundtrip(value.numpy(), qtype))

    def input(self, weight: ir.Tensor, x: torch.Tensor) -> torch.Tensor:
        return kernel_input(self.types.get(id(weight)), x)
