"""The reference executor: runs the IR in plain torch and returns logits.

It is the numerical ground truth of the project: verification compares exported files with it,
and calibration and pruning search run on it. It follows the Hugging Face modelling code of each
family operation for operation (float32, RMSNorm, NEOX rope, GQA, softmax routing, SwiGLU experts),
and is tested against transformers' own forward pass. It is also the only place that says how a
family routes (`route`): fitness, baselines and expert plans call it, targets only lower it.

Weights are addressed by IR path ("blocks.0.attn.q", "lm_head") and materialised on first use
through a `Numerics` (by default the IR handle's own data, as float32). Verification runs the
same graph on the exact numbers an export holds by passing numerics that round each weight to
its stored type and each matmul's input the way the runtime's kernel does (llama.cpp's CPU
kernels quantize activations to Q8_0 for Q8_0 weights and round them to F16/BF16 for F16/BF16
weights). Paths, not handles, are the key: a tied embedding is one handle read as "embed" and
as "lm_head", and a file may store the two differently.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .. import ir


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Numerics(Protocol):
    """The numbers a runtime computes with: each weight's value and each matmul's input. A
    numerics may also say how its runtime computes RMSNorm and RoPE's tables (`rms_norm`,
    `rope_tables`, with this module's signatures), where the runtime's arithmetic differs in
    the last bits from torch's and a rounding step downstream can amplify that (GGUF:
    exporters/gguf/numerics.py)."""

    exact: bool  # every weight as the source holds it and no input rounding

    def weight(self, path: str, tensor: ir.Tensor) -> torch.Tensor: ...

    def input(self, path: str, x: torch.Tensor) -> torch.Tensor: ...

    # optional: matmul_extra(path, x) -> Tensor | None, what the runtime's kernel adds to
    # input(path, x) @ W.T beyond the product (GGUF Q4_1/Q5_1: their input's block sums in
    # fp16), read by ReferenceExecutor.linear/matmul


class SourceNumerics:
    """The checkpoint's own values, unrounded: the float model."""

    exact = True

    def weight(self, path: str, tensor: ir.Tensor) -> torch.Tensor:
        return tensor.value()

    def input(self, path: str, x: torch.Tensor) -> torch.Tensor:
        return x


class InputHook(SourceNumerics):
    """Float weights, and `hook(path, x)` sees every matmul input (calibration observers)."""

    def __init__(self, hook: Callable[[str, torch.Tensor], None]):
        self.hook = hook

    def input(self, path: str, x: torch.Tensor) -> torch.Tensor:
        self.hook(path, x)
        return x


class ReferenceExecutor:
    """`jitter` = (sigma, seed) makes this executor a *null* of verification (verify.py):
    every matmul and attention product is multiplied by (1 + sigma * N(0, 1)), a second
    legitimate computation of the same numerics that differs only in accumulation order's last
    bits, as a runtime's kernels do."""

    def __init__(self, model: ir.Model, device: str | None = None,
                 numerics: Numerics | None = None, jitter: tuple[float, int] | None = None):
        self.model = model
        self.device = torch.device(device or default_device())
        self.numerics = numerics or SourceNumerics()
        self.tensors = model.tensor_map()
        self._cache: dict = {}
        self._rms_norm = getattr(self.numerics, "rms_norm", rms_norm)
        self._rope_tables = getattr(self.numerics, "rope_tables", rope_tables)
        self._jitter = None
        if jitter is not None:
            self._jitter = (jitter[0], torch.Generator().manual_seed(jitter[1]))

    # ------------------------------------------------------------------ weights
    def w(self, path: str) -> torch.Tensor | None:
        """The float32 value of the IR tensor at `path` on the executor's device (None when
        the model has none there, e.g. a missing bias), cached by path."""
        hit = self._cache.get(path)
        if hit is None:
            tensor = self.tensors.get(path)
            if tensor is None:
                return None
            hit = self.numerics.weight(path, tensor).to(device=self.device, dtype=torch.float32)
            self._cache[path] = hit
        return hit

    def norm(self, x: torch.Tensor, path: str) -> torch.Tensor:
        """RMSNorm of x with the weight at `path`, as the numerics' runtime computes it."""
        return self._rms_norm(x, self.w(path), self.model.norm_eps)

    def product(self, y: torch.Tensor) -> torch.Tensor:
        """A matmul's result: itself, or jittered in its last bits by a null executor."""
        if self._jitter is None:
            return y
        sigma, generator = self._jitter
        noise = torch.randn(y.shape, generator=generator).to(y.device)
        return y * (1 + sigma * noise)

    def linear(self, x: torch.Tensor, path: str, bias: str | None = None) -> torch.Tensor:
        """x @ W.T (+ bias), with x rounded as the runtime's kernel for the weight would."""
        y = F.linear(self.numerics.input(path, x), self.w(path),
                     None if bias is None else self.w(bias))
        return self.product(self._with_extra(y, path, x))

    def matmul(self, x: torch.Tensor, path: str) -> torch.Tensor:
        """x @ W.T as `linear` computes it, without bias."""
        y = self.numerics.input(path, x) @ self.w(path).T
        return self.product(self._with_extra(y, path, x))

    def _with_extra(self, y: torch.Tensor, path: str, x: torch.Tensor) -> torch.Tensor:
        """y plus what the runtime's kernel adds to the product beyond it (`matmul_extra` of
        the numerics, on the unrounded input x)."""
        extra = getattr(self.numerics, "matmul_extra", None)
        more = None if extra is None else extra(path, x)
        return y if more is None else y + more

    def mlp(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        """SwiGLU of the MLP at `prefix`."""
        h = F.silu(self.matmul(x, f"{prefix}.gate"))
        h = h * self.matmul(x, f"{prefix}.up")
        return self.matmul(h, f"{prefix}.down")

    def experts_stacked(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block i's experts as float32 (E, F, D) gate, (E, F, D) up, (E, D, F) down, built
        once (for merging and comparing experts, which needs one width in the layer), each
        expert copied into its place as it is fetched: a streaming executor fetches experts
        afresh, and a stack of a list would hold the block twice."""
        key = ("stacked", i)
        hit = self._cache.get(key)
        if hit is None:
            moe = self.model.blocks[i].ffn
            widths = sorted({ex.width for ex in moe.experts})
            if len(widths) > 1:
                raise ValueError(f"block {i}: experts of widths {widths} cannot be stacked")
            hit = tuple(self._stack([f"blocks.{i}.ffn.experts.{e}.{name}"
                                     for e in range(moe.n_experts)])
                        for name in ("gate", "up", "down"))
            self._cache[key] = hit
        return hit

    def _stack(self, paths: list[str]) -> torch.Tensor:
        """The weights at `paths` stacked as float32, each widened as it is copied in."""
        tensors = [self.tensors[p] for p in paths]
        out = torch.empty((len(paths), *tensors[0].shape), dtype=torch.float32,
                          device=self.device)
        for e, (path, tensor) in enumerate(zip(paths, tensors)):
            out[e] = self.numerics.weight(path, tensor)
        return out

    def router_map(self, i: int) -> torch.Tensor | None:
        moe = self.model.blocks[i].ffn
        if moe.router_map is None:
            return None
        key = ("router_map", i)
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
        for i in range(len(self.model.blocks)):
            h = self.block_forward(i, h, mask, positions)
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
        return F.embedding(ids, self.w("embed")), mask, positions

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(h, "final_norm"), "lm_head")

    def block_forward(self, i: int, h, mask, positions):
        return self.ffn_residual(i, self.attention_residual(i, h, mask, positions))

    def attention_residual(self, i: int, h, mask, positions):
        """h + attention(norm(h)): block i's first half."""
        x = self.norm(h, f"blocks.{i}.attn_norm")
        return h + self.attention(i, x, mask, positions)

    def ffn_input(self, i: int, h):
        """norm(h): what block i's FFN (dense or MoE) reads."""
        return self.norm(h, f"blocks.{i}.ffn_norm")

    def ffn_residual(self, i: int, h):
        """h + FFN(norm(h)): block i's second half (h itself where the FFN was dropped)."""
        ffn = self.model.blocks[i].ffn
        if ffn is None:
            return h
        x = self.ffn_input(i, h)
        if isinstance(ffn, ir.MoE):
            return h + self.moe(i, x)
        return h + self.mlp(x, f"blocks.{i}.ffn.mlp")

    def attention(self, i: int, x, mask, positions):
        a, p = self.model.blocks[i].attn, f"blocks.{i}.attn"
        b, t, _ = x.shape
        q = self.linear(x, f"{p}.q", f"{p}.q_bias" if a.q_bias is not None else None)
        k = self.linear(x, f"{p}.k", f"{p}.k_bias" if a.k_bias is not None else None)
        v = self.linear(x, f"{p}.v", f"{p}.v_bias" if a.v_bias is not None else None)
        if a.qk_norm == "full":
            q, k = self.norm(q, f"{p}.q_norm"), self.norm(k, f"{p}.k_norm")
        if a.clip_qkv is not None:
            q, k, v = (z.clamp(-a.clip_qkv, a.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, a.n_heads, a.head_dim)
        k = k.view(b, t, a.n_kv_heads, a.head_dim)
        v = v.view(b, t, a.n_kv_heads, a.head_dim)
        if a.qk_norm == "head":
            q, k = self.norm(q, f"{p}.q_norm"), self.norm(k, f"{p}.k_norm")
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        cos, sin = self._rope_tables(positions, self.model.rope, self.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = a.n_heads // a.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = self.product(q @ k.transpose(-1, -2)) * a.head_dim ** -0.5
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        out = self.product(torch.softmax(scores, dim=-1) @ v)
        out = out.transpose(1, 2).reshape(b, t, a.n_heads * a.head_dim)
        return self.linear(out, f"{p}.o")

    def router_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block i's router logits for tokens x (N, D)."""
        return self.linear(x, f"blocks.{i}.ffn.router.weight")

    def route(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids and their weights for tokens x (N, D) in block i."""
        return route(self.model.blocks[i].ffn, self.router_logits(i, x), self.router_map(i))

    def moe(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block i's MoE on tokens x, expert by expert: each expert's weights are fetched when
        its turn comes (a streaming executor fetches and drops them, so one expert is resident
        at a time)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router_logits(i, x)
        idx, weights = route(self.model.blocks[i].ffn, logits, self.router_map(i))
        self.observe_routing(i, x, logits, idx, weights)
        prefix = f"blocks.{i}.ffn.experts"

        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            out = self.mlp(x[rows], f"{prefix}.{e}")
            self.observe_expert(i, e, rows, out, weights, idx)
            return out

        out = combine_experts(x, idx, weights, expert)
        shared = self.shared_expert(i, x)
        return (out if shared is None else out + shared).reshape(shape)

    # observation points for calibration statistics (no-ops here; see runtime/streaming.py)
    def observe_routing(self, i, x, logits, idx, weights) -> None:
        pass

    def observe_expert(self, i, e, rows, out, weights, idx) -> None:
        pass

    def shared_expert(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Block i's always-on expert output (None when its MoE has none)."""
        shared = self.model.blocks[i].ffn.shared
        if shared is None:
            return None
        p = f"blocks.{i}.ffn.shared"
        y = self.mlp(x, f"{p}.mlp")
        if shared.gate is not None:
            y = y * torch.sigmoid(self.linear(x, f"{p}.gate"))
        return y


# ---------------------------------------------------------------------- routing semantics


def route(moe: ir.MoE, logits: torch.Tensor, router_map: torch.Tensor | None = None,
          top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """How an MoE layer routes, given its router logits (N, R): the scoring function over the
    router's rows, EEP's router map when the layer has one ((E, R): the probabilities of the
    original experts mapped to the E experts kept), then the top-k experts' weights,
    renormalised when the family does so. `top_k` overrides the layer's own (a candidate with
    fewer experts than k)."""
    if moe.scoring != "softmax":
        raise NotImplementedError(f"'{moe.scoring}' routing")
    probs = torch.softmax(logits, dim=-1)
    if router_map is not None:
        probs = probs @ router_map.T
    return select_experts(probs, moe.top_k if top_k is None else top_k, moe.norm_topk)


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
