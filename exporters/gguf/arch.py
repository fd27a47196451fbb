"""Which IR llama.cpp can run faithfully, and as which of its archs: the GGUF dialect check.

llama.cpp's graphs are fixed per arch (see shared/research/gguf.md): each computes one routing
(renormalised top-k or not), one q/k norm, with or without a sigmoid-gated shared expert. An IR
the target graph would compute differently (e.g. Qwen3-MoE without top-k renormalisation) is
refused with the reason, never written.
"""

from __future__ import annotations

from dataclasses import dataclass

from moecompile import ir
from moecompile.errors import UserError


@dataclass(frozen=True)
class Arch:
    name: str  # llama.cpp's arch
    qk_norm: str  # the q/k norm its graph computes: "none" | "head" | "full"
    renormalises: bool  # top-k routing weights renormalised to sum 1
    shared_expert: bool  # a sigmoid-gated shared expert


ARCHS = {
    "mixtral": Arch("llama", "none", True, False),
    "qwen2_moe": Arch("qwen2moe", "none", False, True),
    "qwen3_moe": Arch("qwen3moe", "head", True, False),
    "olmoe": Arch("olmoe", "full", False, False),
}
MAX_EXPERTS = 256  # LLAMA_MAX_EXPERTS of older llama.cpp builds; 0.3.36 allows 1024
# Where llama.cpp's loader reads the expert FFN length (src/models/<arch>.cpp, load_arch_*):
# llama and olmoe size every layer's expert tensors by n_ff() — the feed_forward_length of
# layer 0 —, qwen2moe and qwen3moe by the one expert_feed_forward_length; qwen2moe's shared
# experts by the one expert_shared_feed_forward_length. And a layer's experts are one stacked
# 3-D tensor. So a GGUF holds one routed-expert width (and one shared-expert width) per model.


def width_refusal(values, what: str = "expert") -> str:
    """Why a GGUF cannot hold these different widths."""
    key = ("one expert_shared_feed_forward_length" if what == "shared" else
           "one expert FFN length per model (feed_forward_length of layer 0 for llama/olmoe, "
           "expert_feed_forward_length for qwen2moe/qwen3moe)")
    return (f"llama.cpp reads {key} and stacks a layer's experts in one tensor, so a GGUF "
            f"holds one {what} width for the whole model, not {values}; give one width, or use "
            "--target onnx (a width per layer, or per expert in its portable form)")


def check_exportable(model: ir.Model) -> str:
    """Return llama.cpp's arch name for `model`, or raise UserError saying why it can't be exact."""
    if model.family not in ARCHS:
        raise UserError(f"family '{model.family}' has no GGUF mapping")
    spec = ARCHS[model.family]
    arch, qk_norm, renorm, shared = spec.name, spec.qk_norm, spec.renormalises, spec.shared_expert
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
    widths = sorted({ex.width for f in moes for ex in f.experts})
    if len(widths) > 1:
        raise UserError(f"experts of widths {widths}: " + width_refusal(widths))
    shared_widths = sorted({f.shared.mlp.width for f in moes if f.shared is not None})
    if len(shared_widths) > 1:
        raise UserError(f"shared experts of widths {shared_widths}: "
                        + width_refusal(shared_widths, "shared"))
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
