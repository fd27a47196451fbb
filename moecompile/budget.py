"""Memory sizes: parsing what users type, and what llama.cpp will allocate for a model.

    parse_size("24GB") -> 24_000_000_000;  parse_size("8GiB") -> 8 * 2**30

Runtime memory = weight tensors (exact: the GGUF's tensor bytes) + KV cache for the context
(llama.cpp's default F16 K and V: 2 bytes x 2 x context x layers x KV heads x head size) +
the CPU compute buffer llama.cpp reserves for its worst-case micro-batch. The context is
rounded up to llama.cpp's 256 KV cells. The compute buffer formula was fitted to llama.cpp
0.3.36's own "compute buffer size" report (flash attention off, n_ubatch = min(512,
context)): the attention scores and mask, 4 bytes x ubatch x cells x (heads + 1), plus the largest per-token activation, 4 bytes x ubatch x max(vocab, 2 x
(active experts x FFN + hidden)).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from . import ir
from .errors import UserError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
UBATCH = 512
KV_BYTES = 2  # F16 cache entries, llama.cpp's default
KV_PAD = 256


def parse_size(text: str, what: str = "--budget") -> int:
    """'24GB', '8GiB', '512MB', '1.5G', or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise UserError(f"{what} '{text}': expected a size such as 24GB, 8GiB, 512MB or a number "
                        "of bytes")
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise UserError(f"{what} '{text}': must be more than zero")
    return int(value)


def format_size(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class Memory:
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def kv_cells(context: int) -> int:
    """llama.cpp rounds the KV cache up to a multiple of 256 cells."""
    return -(-context // KV_PAD) * KV_PAD


def kv_cache_bytes(model: ir.Model, context: int) -> int:
    cells = kv_cells(context)
    return sum(KV_BYTES * 2 * cells * b.attn.n_kv_heads * b.attn.head_dim for b in model.blocks)


def compute_bytes(model: ir.Model, context: int) -> int:
    ubatch = min(UBATCH, context)
    heads = max(b.attn.n_heads for b in model.blocks)
    widest = model.vocab
    for b in model.blocks:
        if isinstance(b.ffn, ir.MoE):
            ffn = b.ffn.top_k * b.ffn.experts[0].gate.shape[0]
            if b.ffn.shared is not None:
                ffn += b.ffn.shared.mlp.gate.shape[0]
        elif b.ffn is not None:
            ffn = b.ffn.mlp.gate.shape[0]
        else:
            ffn = 0
        widest = max(widest, 2 * (ffn + model.hidden))
    return 4 * ubatch * (kv_cells(context) * (heads + 1) + widest)


def memory(model: ir.Model, weights_bytes: int, context: int) -> Memory:
    return Memory(weights_bytes, kv_cache_bytes(model, context), compute_bytes(model, context))
