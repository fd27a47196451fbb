"""Random-weight Hugging Face checkpoints with the exact shapes of real MoE models, streamed.

Why this exists: the scale work (streaming calibration, per-tensor quantization, peak-RSS
assertions; see shared/research/scale.md §6) needs checkpoints whose *shapes* are those of
OLMoE-1B-7B, Qwen3-30B-A3B, Mixtral-8x7B or Qwen1.5-MoE-A2.7B, at full or reduced depth. Their
values do not matter, but their size does: a 14-94 GB checkpoint cannot be built the way the
test builders build tiny ones (instantiate the transformers model, then `save_pretrained`),
because that holds the whole model in memory. This module never holds more than one chunk of
one tensor (4 Mi values): it plans every tensor from the config alone, writes the safetensors
header first, then generates each tensor chunk by chunk with a seeded generator and appends
its bytes to the shard file.

What is written into `out_dir`:

* `config.json`: the model's public config.json values (recorded below in `FAMILIES`), with
  `num_hidden_layers` set to `layers`, passed through transformers' own config class and saved
  by it, so the file is exactly what transformers 5 writes when it loads and re-saves the real
  config (e.g. `rope_theta` becomes `rope_parameters`, Qwen3's `num_experts` becomes
  `num_local_experts`). Special-token ids are the one deviation: they point at the stand-in
  tokenizer's `<|endoftext|>` (id 0), because the real ids (e.g. 151645) do not exist in it.
* `generation_config.json`, as `save_pretrained` writes it.
* safetensors shards named as `save_pretrained` names them (`model.safetensors` for one shard;
  `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` for several), with the
  key names `save_pretrained` writes (checked against tiny models saved by transformers 5.24):
  per-expert keys (`block_sparse_moe.experts.E.w1/w2/w3` for Mixtral,
  `mlp.experts.E.gate_proj/up_proj/down_proj` for the others) by default, or transformers 5's
  fused in-memory layout (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj`
  [E, D, F], router at `mlp.gate.weight` for every family) with `fused_experts=True`.
* a small byte-level BPE tokenizer (`tokenizer.json`, `tokenizer_config.json`) trained on
  Python standard-library sources. It covers far fewer ids than the embedding has rows; that
  is allowed (real checkpoints pad their vocabularies too) and keeps building it fast.

Values: every projection is `std * N(0, 1)`, every RMSNorm weight `1 + norm_std * N(0, 1)`
(so a converter that drops a norm produces a visible mismatch rather than an identity op)
and every bias `bias_std * N(0, 1)`, rounded to `dtype` (round-to-nearest-even, torch's
conversion). Values are a pure function of (seed, logical tensor name, shape): each logical
tensor gets its own `torch.Generator` seeded from a hash of the seed and its per-expert key
name, and is drawn in chunks whose size depends only on the tensor's row length. Hence the
fused and per-expert layouts hold identical numbers, the shard size does not change any value,
and `tensor_values()` can regenerate any tensor for a check without reading the file.

Layer order on disk: embedding, then layer 0's tensors, layer 1's, ..., final norm, lm_head,
so one decoder layer is one contiguous byte range of one shard (good for a layer-major
streaming reader that does large sequential reads). Shards are filled greedily in that order
and a tensor is never split across shards.

Crash safety: shards are written under `*.partial` names and renamed when complete;
`config.json` is written last, so an interrupted directory is never mistaken for a checkpoint
(moecompile's frontend and transformers both need config.json).

Usage:
    python -m moecompile.testing.synthetic olmoe-1b-7b OUT_DIR [--layers 16] [--dtype bf16] [--seed 0]
                               [--shard-gb 4] [--fused-experts]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import queue
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- model facts

# Public config.json values of each model (Hugging Face hub, as published; legacy key names as
# the hub files spell them). Only structure-relevant fields plus the usual training-time fields
# are kept; transformers fills in its defaults for the rest. `num_hidden_layers` here is the
# real depth and is replaced by the `layers` argument.
FAMILIES: dict[str, dict] = {
    # allenai/OLMoE-1B-7B-0924: 6.92 B params, q/k RMSNorm over the whole projection (kv heads
    # == heads), no top-k renormalisation.
    "olmoe-1b-7b": {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
        "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 1024, "max_position_embeddings": 4096,
        "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 50304,
    },
    # Qwen/Qwen3-30B-A3B: 30.5 B params, head_dim 128 independent of hidden/heads, GQA 32/4,
    # per-head q/k RMSNorm, top-k renormalised, 128 experts of width 768.
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "attention_bias": False, "attention_dropout": 0.0, "decoder_sparse_step": 1,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
        "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
        "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936,
    },
    # mistralai/Mixtral-8x7B-v0.1: 46.7 B params, GQA 32/8, 8 experts of width 14336, top-2
    # (always renormalised), no q/k norm.
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": 32000,
    },
    # Qwen/Qwen1.5-MoE-A2.7B: 14.3 B params, 60 experts of width 1408 (not a multiple of 256:
    # exercises llama.cpp's k-quant fallback), a sigmoid-gated shared expert of width 5632,
    # q/k/v biases, no top-k renormalisation.
    "qwen1.5-moe-a2.7b": {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "attention_dropout": 0.0, "decoder_sparse_step": 1, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
        "max_position_embeddings": 8192, "max_window_layers": 21,
        "moe_intermediate_size": 1408, "norm_topk_prob": False, "num_attention_heads": 16,
        "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24,
        "num_key_value_heads": 16, "output_router_logits": False, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 5632, "sliding_window": 32768,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    },
}

SPECIAL_TOKEN = "<|endoftext|>"  # id 0 of the stand-in tokenizer; bos = eos
TOKENIZER_VOCAB = 1024

# safetensors dtype names and bytes per value
_DTYPES = {"bf16": ("BF16", torch.bfloat16, 2), "f16": ("F16", torch.float16, 2),
           "f32": ("F32", torch.float32, 4)}

# Values generated per generator call. Part of the value definition (a different chunking
# draws different numbers), so it is a constant, not a tuning knob: rows per chunk =
# max(1, CHUNK_VALUES // row_length).
CHUNK_VALUES = 1 << 22

GB = 10 ** 9
RECIPE_KEY = "synth_checkpoint.recipe"


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Piece:
    """A logical tensor: what one generator draws. A stored tensor is one or more pieces laid
    end to end (a fused expert tensor is E gate/up or down pieces)."""

    name: str  # the per-expert checkpoint key, whichever layout is written
    shape: tuple[int, ...]
    kind: str  # "weight" | "norm" | "bias"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorPlan:
    key: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.pieces)


def family_config(family: str, layers: int | None = None, overrides: dict | None = None) -> dict:
    """The public config of `family` with `num_hidden_layers` replaced (legacy key names), and
    `overrides` applied (a smaller model with the family's structure, for tests)."""
    try:
        cfg = {**FAMILIES[family], **(overrides or {})}
    except KeyError:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}") from None
    if layers is not None:
        if layers < 1:
            raise ValueError("layers must be >= 1")
        cfg["num_hidden_layers"] = int(layers)
    return cfg


def plan_tensors(cfg: dict, fused_experts: bool = False) -> list[TensorPlan]:
    """Every stored tensor in writing order, from the config alone (no data)."""
    arch = cfg["model_type"]
    d = cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or d // n_heads
    vocab = cfg["vocab_size"]
    n_exp = cfg.get("num_local_experts") or cfg["num_experts"]
    ffn = cfg["intermediate_size"] if arch == "mixtral" else cfg.get(
        "moe_intermediate_size", cfg["intermediate_size"])
    out: list[TensorPlan] = []

    def one(key: str, shape: tuple[int, ...], kind: str = "weight") -> None:
        out.append(TensorPlan(key, tuple(shape), (Piece(key, tuple(shape), kind),)))

    one("model.embed_tokens.weight", (vocab, d))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        one(p + "input_layernorm.weight", (d,), "norm")
        att = p + "self_attn."
        one(att + "q_proj.weight", (n_heads * head_dim, d))
        one(att + "k_proj.weight", (n_kv * head_dim, d))
        one(att + "v_proj.weight", (n_kv * head_dim, d))
        one(att + "o_proj.weight", (d, n_heads * head_dim))
        if arch == "qwen2_moe":  # Qwen2 always has q/k/v biases (config qkv_bias, default on)
            one(att + "q_proj.bias", (n_heads * head_dim,), "bias")
            one(att + "k_proj.bias", (n_kv * head_dim,), "bias")
            one(att + "v_proj.bias", (n_kv * head_dim,), "bias")
        if arch == "qwen3_moe":  # per-head RMSNorm
            one(att + "q_norm.weight", (head_dim,), "norm")
            one(att + "k_norm.weight", (head_dim,), "norm")
        elif arch == "olmoe":  # RMSNorm over the whole projection
            one(att + "q_norm.weight", (n_heads * head_dim,), "norm")
            one(att + "k_norm.weight", (n_kv * head_dim,), "norm")
        one(p + "post_attention_layernorm.weight", (d,), "norm")
        if arch == "qwen2_moe" and not _is_moe_layer(cfg, i):
            raise ValueError("dense Qwen2-MoE layers are not generated (none in the real model)")
        moe = p + ("block_sparse_moe." if arch == "mixtral" else "mlp.")
        names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        router = Piece(moe + "gate.weight", (n_exp, d), "weight")
        gate = [Piece(f"{moe}experts.{e}.{names[0]}.weight", (ffn, d), "weight") for e in range(n_exp)]
        up = [Piece(f"{moe}experts.{e}.{names[1]}.weight", (ffn, d), "weight") for e in range(n_exp)]
        down = [Piece(f"{moe}experts.{e}.{names[2]}.weight", (d, ffn), "weight") for e in range(n_exp)]
        if fused_experts:
            # transformers 5's in-memory layout; Mixtral's module is renamed to `mlp.` as well
            fp = p + "mlp."
            out.append(TensorPlan(fp + "gate.weight", router.shape, (router,)))
            out.append(TensorPlan(fp + "experts.gate_up_proj", (n_exp, 2 * ffn, d),
                                  tuple(x for e in range(n_exp) for x in (gate[e], up[e]))))
            out.append(TensorPlan(fp + "experts.down_proj", (n_exp, d, ffn), tuple(down)))
        else:
            out.append(TensorPlan(router.name, router.shape, (router,)))
            for e in range(n_exp):
                # save_pretrained's per-expert order within an expert does not matter to
                # readers; gate, up, down keeps each expert's bytes together
                for piece in (gate[e], up[e], down[e]):
                    out.append(TensorPlan(piece.name, piece.shape, (piece,)))
        if arch == "qwen2_moe":
            fs = cfg["shared_expert_intermediate_size"]
            one(moe + "shared_expert.gate_proj.weight", (fs, d))
            one(moe + "shared_expert.up_proj.weight", (fs, d))
            one(moe + "shared_expert.down_proj.weight", (d, fs))
            one(moe + "shared_expert_gate.weight", (1, d))
    one("model.norm.weight", (d,), "norm")
    if not cfg.get("tie_word_embeddings", False):
        one("lm_head.weight", (vocab, d))
    return out


def _is_moe_layer(cfg: dict, i: int) -> bool:
    step = cfg.get("decoder_sparse_step", 1) or 1
    return i not in (cfg.get("mlp_only_layers") or []) and (i + 1) % step == 0


def plan_shards(tensors: list[TensorPlan], bytes_per_value: int,
                shard_bytes: int) -> list[list[TensorPlan]]:
    """Greedy, in writing order; a tensor larger than `shard_bytes` gets a shard of its own."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.numel * bytes_per_value
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# ----------------------------------------------------------------------------- values


def _piece_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, logical tensor name): stable across runs, Python
    versions and machines (no use of hash())."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _piece_chunks(piece: Piece, seed: int, std: float, norm_std: float,
                  bias_std: float) -> Iterator[torch.Tensor]:
    """The float32 values of one logical tensor, flattened, in chunks of whole rows."""
    gen = torch.Generator().manual_seed(_piece_seed(seed, piece.name))
    row = piece.shape[-1]
    rows = piece.numel // row
    step = max(1, CHUNK_VALUES // row)
    for start in range(0, rows, step):
        x = torch.randn((min(step, rows - start) * row,), generator=gen, dtype=torch.float32)
        if piece.kind == "norm":
            x.mul_(norm_std).add_(1.0)
        else:
            x.mul_(bias_std if piece.kind == "bias" else std)
        yield x


def _encode(chunk: torch.Tensor, torch_dtype: torch.dtype):
    """A float32 chunk as the bytes stored for `torch_dtype` (a numpy array; numpy has no
    bfloat16, so bf16 travels as its raw int16 bits)."""
    converted = chunk if torch_dtype == torch.float32 else chunk.to(torch_dtype)
    if torch_dtype == torch.bfloat16:
        converted = converted.view(torch.int16)
    return converted.numpy()


def tensor_chunks(t: TensorPlan, dtype: str, seed: int, std: float, norm_std: float,
                  bias_std: float) -> Iterator:
    """The stored bytes of tensor `t`, in writing order, one generator chunk at a time (numpy
    arrays of the stored element size). The single definition of a tensor's content: the
    writer and the checks both use it."""
    torch_dtype = _DTYPES[dtype][1]
    for piece in t.pieces:
        for chunk in _piece_chunks(piece, seed, std, norm_std, bias_std):
            yield _encode(chunk, torch_dtype)


def _recipe_plan(recipe: dict, key: str) -> TensorPlan:
    if recipe.get("chunk_values", CHUNK_VALUES) != CHUNK_VALUES:
        raise ValueError("checkpoint was written with another chunking; its values differ")
    plans = plan_tensors(family_config(recipe["family"], recipe["layers"], recipe.get("overrides")),
                         recipe["fused_experts"])
    for t in plans:
        if t.key == key:
            return t
    raise KeyError(key)


def tensor_values(family: str, key: str, *, layers: int | None = None, dtype: str = "bf16",
                  std: float = 0.02, norm_std: float = 0.1, bias_std: float = 0.02, seed: int = 0,
                  fused_experts: bool = False) -> torch.Tensor:
    """Regenerate one stored tensor exactly as `write_checkpoint` writes it (for checks; this
    holds the whole tensor; `tensor_chunks` does not)."""
    recipe = {"family": family, "layers": family_config(family, layers)["num_hidden_layers"],
              "fused_experts": fused_experts}
    t = _recipe_plan(recipe, key)
    parts = [torch.from_numpy(c) for c in tensor_chunks(t, dtype, seed, std, norm_std, bias_std)]
    flat = torch.cat(parts)
    if dtype == "bf16":
        flat = flat.view(torch.bfloat16)
    return flat.reshape(t.shape)


def recipe_of(folder: str | Path) -> dict:
    """The generation recipe stored in a synthetic checkpoint's first shard header."""
    folder = Path(folder)
    first = min(folder.glob("model*.safetensors"))
    with open(first, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))["__metadata__"]
    return json.loads(meta[RECIPE_KEY])


def tensor_values_of(folder: str | Path, key: str) -> torch.Tensor:
    """`tensor_values` with the recipe read from the checkpoint in `folder`."""
    r = recipe_of(folder)
    return tensor_values(r["family"], key, layers=r["layers"], dtype=r["dtype"], std=r["std"],
                         norm_std=r["norm_std"], bias_std=r["bias_std"], seed=r["seed"],
                         fused_experts=r["fused_experts"])


def tensor_chunks_of(folder: str | Path, key: str) -> Iterator:
    """`tensor_chunks` for tensor `key` of the checkpoint in `folder` (recipe from its header)."""
    r = recipe_of(folder)
    return tensor_chunks(_recipe_plan(r, key), r["dtype"], r["seed"], r["std"], r["norm_std"],
                         r["bias_std"])


# ----------------------------------------------------------------------------- writing


def _header(tensors: list[TensorPlan], st_dtype: str, bytes_per_value: int,
            recipe: dict) -> bytes:
    """safetensors header: u64 little-endian length, then JSON padded with spaces to a
    multiple of 8 (as the reference writer does, so the data of 2- and 4-byte dtypes is
    aligned for memory mapping). Offsets are relative to the end of the header and the tensors
    tile the data section without gaps, which safetensors' validator requires.

    `__metadata__` holds `format: pt` (transformers refuses files without it) and the recipe
    (family, seed, scales, dtype, layout) as a JSON string, so a checkpoint says how to
    regenerate its own values (`recipe_of`, `tensor_values`)."""
    meta: dict = {"__metadata__": {"format": "pt", RECIPE_KEY: json.dumps(recipe, sort_keys=True)}}
    offset = 0
    for t in tensors:
        nbytes = t.numel * bytes_per_value
        meta[t.key] = {"dtype": st_dtype, "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


class _Writer:
    """Appends byte buffers to a file on a background thread, so disk writes overlap the
    generator (both release the GIL). The queue is bounded: at most `depth` chunks wait."""

    def __init__(self, path: Path, depth: int = 3):
        self.file = open(path, "wb")
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    view = memoryview(item).cast("B")
                    self.file.write(view)
                    self.written += view.nbytes
                except Exception as exc:  # re-raised in the caller's thread by put()/close()
                    self.error = exc

    def put(self, buffer) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(buffer)

    def close(self, fsync: bool) -> None:
        self.queue.put(None)
        self.thread.join()
        try:
            if self.error is None and fsync:
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()
        if self.error is not None:
            raise self.error


@dataclass
class WriteReport:
    out_dir: Path
    files: list[str]
    tensors: int
    parameters: int
    data_bytes: int
    seconds: float
    peak_rss_mib: float = field(default=0.0)


def write_checkpoint(family: str, out_dir: str | Path, layers: int | None = None,
                     dtype: str = "bf16", std: float = 0.02, seed: int = 0,
                     shard_bytes: int = 4 * GB, fused_experts: bool = False, *,
                     norm_std: float = 0.1, bias_std: float = 0.02, fsync: bool = True,
                     progress: bool = False, overrides: dict | None = None) -> WriteReport:
    """Write a random-weight checkpoint of `family` with `layers` decoder layers (default: the
    real depth) into `out_dir` (created; existing checkpoint files in it are replaced).

    Peak memory is one chunk of values (CHUNK_VALUES float32 plus their `dtype` copy, a few
    in flight to the writer thread) on top of the interpreter and torch: ~0.1 GB beyond imports,
    whatever the model size. Returns a `WriteReport`.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = family_config(family, layers, overrides)
    st_dtype, _, nbytes_value = _DTYPES[dtype]
    tensors = plan_tensors(cfg, fused_experts)
    shards = plan_shards(tensors, nbytes_value, shard_bytes)
    names = shard_names(len(shards))
    recipe = {"family": family, "layers": cfg["num_hidden_layers"], "dtype": dtype, "std": std,
              "norm_std": norm_std, "bias_std": bias_std, "seed": seed,
              "fused_experts": fused_experts, "chunk_values": CHUNK_VALUES,
              "overrides": overrides or {}}

    for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / "model.safetensors.index.json",
                                                             out_dir / "config.json"]:
        stale.unlink(missing_ok=True)  # a previous run's shards with other names/counts

    _write_tokenizer(out_dir)

    total_values = sum(t.numel for t in tensors)
    done = 0
    for shard, name in zip(shards, names):
        partial = out_dir / (name + ".partial")
        header = _header(shard, st_dtype, nbytes_value, recipe)
        writer = _Writer(partial)
        try:
            writer.put(header)
            for t in shard:
                for chunk in tensor_chunks(t, dtype, seed, std, norm_std, bias_std):
                    writer.put(chunk)
                    done += chunk.size
                if progress:
                    print(f"\r{name}: {100 * done / total_values:5.1f} % ({t.key})".ljust(100),
                          end="", file=sys.stderr, flush=True)
        finally:
            writer.close(fsync)
        expected = len(header) + sum(t.numel for t in shard) * nbytes_value
        if writer.written != expected:
            raise AssertionError(f"{name}: wrote {writer.written} bytes, planned {expected}")
        partial.rename(out_dir / name)
    if progress:
        print(file=sys.stderr)

    data_bytes = total_values * nbytes_value
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": total_values, "total_size": data_bytes},
                 "weight_map": {t.key: name for shard, name in zip(shards, names)
                                for t in sorted(shard, key=lambda t: t.key)}}
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_config(out_dir, cfg, dtype)  # last: marks the directory complete
    return WriteReport(out_dir, names, len(tensors), total_values, data_bytes,
                       time.perf_counter() - t0, _peak_rss_mib())


# ----------------------------------------------------------------------------- config, tokenizer


def _write_config(out_dir: Path, cfg: dict, dtype: str) -> None:
    """Save through transformers' config class, i.e. exactly as transformers 5 re-saves the real
    config.json after loading it."""
    from transformers import CONFIG_MAPPING, GenerationConfig

    cfg = dict(cfg)
    cfg["torch_dtype"] = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype]
    # the stand-in tokenizer's ids (see module docstring); pad stays unset, as in Mixtral
    cfg.update(bos_token_id=0, eos_token_id=0, pad_token_id=None)
    config = CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)


def _write_tokenizer(out_dir: Path, vocab_size: int = TOKENIZER_VOCAB) -> None:
    """The test builders' byte-level BPE (any text round-trips; `<|endoftext|>` is id 0 and
    serves as bos, eos and pad)."""
    from .models import train_tokenizer

    train_tokenizer(out_dir, vocab_size)


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: real depth)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=4.0, help="max shard size, GB (1e9 bytes)")
    ap.add_argument("--fused-experts", action="store_true")
    ap.add_argument("--no-fsync", action="store_true")
    args = ap.parse_args(argv)
    report = write_checkpoint(args.family, args.out_dir, args.layers, args.dtype, args.std,
                              args.seed, int(args.shard_gb * GB), args.fused_experts,
                              fsync=not args.no_fsync, progress=True)
    print(json.dumps({"out_dir": str(report.out_dir), "files": report.files,
                      "tensors": report.tensors, "parameters": report.parameters,
                      "data_bytes": report.data_bytes, "seconds": round(report.seconds, 2),
                      "peak_rss_mib": round(report.peak_rss_mib, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
