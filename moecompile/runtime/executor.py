"""The reference executor: runs the IR in plain torch and returns logits.

It is the numerical ground truth of the project: verification compares exported files with it,
and calibration and pruning search run on it. It follows the Hugging Face modelling code of each
family operation for operation (float32, RMSNorm, NEOX rope, GQA, softmax routing, SwiGLU experts),
and is tested against transformers' own forward pass.

Weights are materialised on first use through `weight_fn` (by default the IR handle's own
data). Verification runs the same graph on the exact numbers an export holds by passing a
`weight_fn` that rounds weights to their stored type and an `input_fn` that rounds each matmul's
input the way the runtime's kernel does (llama.cpp's CPU kernels quantize activations to Q8_0
for Q8_0 weights and round them to F16/BF16 for F16/BF16 weights).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import ir


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ReferenceExecutor:
    def __init__(self, model: ir.Model, device: str | None = None,
                 weight_fn: Callable[[ir.Tensor], torch.Tensor] | None = None,
                 input_fn: Callable[[ir.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self.device = torch.device(device or default_device())
        self._weight_fn = weight_fn or (lambda t: t.value())
        self._input_fn = input_fn
        self._cache: dict = {}

    # ------------------------------------------------------------------ weights
    def w(self, t: ir.Tensor | None) -> torch.Tensor | None:
        """The float32 value of an IR tensor on the executor's device, cached by identity."""
        if t is None:
            return None
        hit = self._cache.get(id(t))
        if hit is None:
            hit = self._weight_fn(t).to(device=self.device, dtype=torch.float32)
            self._cache[id(t)] = hit
        return hit

    def linear(self, x: torch.Tensor, weight: ir.Tensor, bias: ir.Tensor | None = None):
        """x @ weight.T (+ bias), with x rounded as the runtime's kernel for `weight` would."""
        if self._input_fn is not None:
            x = self._input_fn(weight, x)
        return F.linear(x, self.w(weight), self.w(bias))

    def mlp(self, x: torch.Tensor, mlp: ir.Expert, gate=None, up=None, down=None):
        """SwiGLU; `gate/up/down` override the weights (slices of stacked experts)."""
        fn = self._input_fn or (lambda t, z: z)
        xg = fn(mlp.gate, x)
        h = F.silu(xg @ (self.w(mlp.gate) if gate is None else gate).T) * (
            fn(mlp.up, x) @ (self.w(mlp.up) if up is None else up).T)
        return fn(mlp.down, h) @ (self.w(mlp.down) if down is None else down).T

    def experts_stacked(self, moe: ir.MoE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(E, F, D) gate, (E, F, D) up, (E, D, F) down, built once per MoE node."""
        key = id(moe)
        hit = self._cache.get(key)
        if hit is None:
            hit = tuple(torch.stack([self.w(getattr(ex, name)) for ex in moe.experts])
                        for name in ("gate", "up", "down"))
            self._cache[key] = hit
        return hit

    def router_map(self, moe: ir.MoE) -> torch.Tensor:
        key = ("router_map", id(moe))
        hit = self._cache.get(key)
        if hit is None:
            hit = torch.tensor(moe.router_map, dtype=torch.float32, device=self.device)
            self._cache[key] = hit
        return hit

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T); `attention_mask` marks real tokens (1)."""
        h, mask, positions = self.embed(ids, attention_mask)
        for block in self.model.blocks:
            h = self.block_forward(block, h, mask, positions)
        return self.head(h)

    def embed(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        ids = torch.as_tensor(ids, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        b, t = ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=self.device)
        attention_mask = torch.as_tensor(attention_mask, device=self.device)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        return F.embedding(ids, self.w(self.model.embed)), mask, positions

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(rms_norm(h, self.w(self.model.final_norm), self.model.norm_eps),
                           self.model.lm_head)

    def block_forward(self, block: ir.Block, h, mask, positions):
        return self.ffn_residual(block, self.attention_residual(block, h, mask, positions))

    def attention_residual(self, block: ir.Block, h, mask, positions):
        """h + attention(norm(h)): the block's first half."""
        x = rms_norm(h, self.w(block.attn_norm), self.model.norm_eps)
        return h + self.attention(block.attn, x, mask, positions)

    def ffn_input(self, block: ir.Block, h):
        """norm(h): what the block's FFN (dense or MoE) reads."""
        return rms_norm(h, self.w(block.ffn_norm), self.model.norm_eps)

    def ffn_residual(self, block: ir.Block, h):
        """h + FFN(norm(h)): the block's second half (h itself where the FFN was dropped)."""
        if block.ffn is None:
            return h
        x = self.ffn_input(block, h)
        if isinstance(block.ffn, ir.MoE):
            return h + self.moe(block.ffn, x)
        return h + self.mlp(x, block.ffn.mlp)

    def attention(self, a: ir.Attention, x, mask, positions):
        b, t, _ = x.shape
        w = self.w
        q = self.linear(x, a.q, a.q_bias)
        k = self.linear(x, a.k, a.k_bias)
        v = self.linear(x, a.v, a.v_bias)
        eps = self.model.norm_eps
        if a.qk_norm == "full":
            q, k = rms_norm(q, w(a.q_norm), eps), rms_norm(k, w(a.k_norm), eps)
        if a.clip_qkv is not None:
            q, k, v = (z.clamp(-a.clip_qkv, a.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, a.n_heads, a.head_dim)
        k = k.view(b, t, a.n_kv_heads, a.head_dim)
        v = v.view(b, t, a.n_kv_heads, a.head_dim)
        if a.qk_norm == "head":
            q, k = rms_norm(q, w(a.q_norm), eps), rms_norm(k, w(a.k_norm), eps)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        cos, sin = rope_tables(positions, self.model.rope, self.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = a.n_heads // a.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * a.head_dim ** -0.5
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        out = torch.softmax(scores, dim=-1) @ v
        out = out.transpose(1, 2).reshape(b, t, a.n_heads * a.head_dim)
        return self.linear(out, a.o)

    def route(self, moe: ir.MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids and their weights for tokens x (N, D)."""
        probs = torch.softmax(self.linear(x, moe.router.weight), dim=-1)
        if moe.router_map is not None:
            probs = probs @ self.router_map(moe).T
        return select_experts(probs, moe.top_k, moe.norm_topk)

    def moe(self, moe: ir.MoE, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, weights = self.route(moe, x)
        gate, up, down = self.experts_stacked(moe)
        out = combine_experts(x, idx, weights, lambda e, rows: self.mlp(
            x[rows], moe.experts[e], gate[e], up[e], down[e]))
        shared = self.shared_expert(moe, x)
        return (out if shared is None else out + shared).reshape(shape)

    def shared_expert(self, moe: ir.MoE, x: torch.Tensor) -> torch.Tensor | None:
        """The always-on expert's output (None when the MoE has none)."""
        if moe.shared is None:
            return None
        y = self.mlp(x, moe.shared.mlp)
        if moe.shared.gate is not None:
            y = y * torch.sigmoid(self.linear(x, moe.shared.gate))
        return y


# ---------------------------------------------------------------------- building blocks


def select_experts(probs: torch.Tensor, k: int, renormalise: bool):
    """(ids, weights) of the k most probable experts per token, renormalised to sum 1 when the
    family does so."""
    weights, idx = torch.topk(probs, k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return idx, weights


def combine_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                    expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum over each token's selected experts of weight * expert output, computed expert by
    expert on the tokens routed to it; `expert(e, rows)` is expert e's output on x[rows]."""
    out = torch.zeros_like(x)
    for e in torch.unique(idx).tolist():
        rows, slot = (idx == e).nonzero(as_tuple=True)
        out.index_add_(0, rows, expert(e, rows) * weights[rows, slot, None])
    return out


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x) on plain weight tensors (no kernel-input rounding)."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(positions: torch.Tensor, rope: ir.Rope, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, rope.dim, 2, dtype=torch.int64,
                                                  device=device).float() / rope.dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]  # (B, 1, T, dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
