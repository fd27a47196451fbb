"""Architecture adapters: map a checkpoint's keys and config fields onto IR nodes.

An adapter only names things; no tensor data is read. Each supported family differs in a few
well-defined places (expert key names, shared expert, q/k norm, routing renormalisation), so one
parametrised builder serves all four and each family is a small `Family` record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import ir
from ..errors import UserError
from .checkpoint import Checkpoint


@dataclass(frozen=True)
class Family:
    name: str
    hf_class: str
    qk_norm: str  # "none" | "head" | "full"
    norm_topk_default: bool | None  # None: the family always renormalises (Mixtral)
    shared_expert: bool = False
    sparse_step: bool = False  # honours decoder_sparse_step / mlp_only_layers (Qwen)


FAMILIES = {
    f.name: f
    for f in (
        Family("mixtral", "MixtralForCausalLM", "none", None),
        Family("qwen2_moe", "Qwen2MoeForCausalLM", "none", False, shared_expert=True,
               sparse_step=True),
        Family("qwen3_moe", "Qwen3MoeForCausalLM", "head", False, sparse_step=True),
        Family("olmoe", "OlmoeForCausalLM", "full", False),
    )
}
_BY_CLASS = {f.hf_class: f for f in FAMILIES.values()}

SUPPORTED = ", ".join(f"{f.hf_class} ({f.name})" for f in FAMILIES.values())

# Known dense architectures get a more helpful message than "unknown".
_DENSE_HINT = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
               "OlmoForCausalLM", "Olmo2ForCausalLM", "GPT2LMHeadModel", "PhiForCausalLM",
               "Phi3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM")


def detect_family(config: dict, where: Path) -> Family:
    archs = config.get("architectures") or []
    for a in archs:
        if a in _BY_CLASS:
            return _BY_CLASS[a]
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    named = ", ".join(archs) or model_type or "none given"
    if any(a in _DENSE_HINT for a in archs):
        raise UserError(f"{where}: {named} is a dense (non-MoE) model; moecompile compiles "
                        f"Mixture-of-Experts models: {SUPPORTED}")
    raise UserError(f"{where}: unsupported architecture {named}; supported: {SUPPORTED}")


def _get(config: dict, key: str, where: Path, default=None):
    value = config.get(key, default)
    if value is None:
        raise UserError(f"{where}/config.json: missing '{key}'")
    return value


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta)


def _check_supported_options(family: Family, config: dict, where: Path) -> None:
    """Refuse settings the reference executor does not implement, rather than compute wrong."""
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}: hidden_act '{act}' is not supported (SwiGLU/silu only)")
    scaling = config.get("rope_scaling") or {}
    params = config.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    if rope_type not in ("default", None):
        raise UserError(f"{where}: rope scaling '{rope_type}' is not supported yet")
    if config.get("use_sliding_window") or (
        family.name == "mixtral" and config.get("sliding_window") is not None
    ):
        raise UserError(f"{where}: sliding-window attention is not supported")


def _tokenizer_info(path: Path, config: dict) -> ir.Tokenizer | None:
    if not ((path / "tokenizer.json").exists() or (path / "tokenizer.model").exists()):
        return None
    tok_cfg = {}
    if (path / "tokenizer_config.json").exists():
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text())

    def special_id(name: str) -> int | None:
        value = config.get(f"{name}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            value = _token_id_from_text(path, tok_cfg.get(f"{name}_token"))
        return value

    return ir.Tokenizer(path=path, bos_id=special_id("bos"), eos_id=special_id("eos"),
                        pad_id=special_id("pad"), add_bos=bool(tok_cfg.get("add_bos_token", False)))


def _token_id_from_text(path: Path, token) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    if not token or not (path / "tokenizer.json").exists():
        return None
    data = json.loads((path / "tokenizer.json").read_text())
    for added in data.get("added_tokens", []):
        if added.get("content") == token:
            return added["id"]
    return (data.get("model", {}).get("vocab") or {}).get(token)


def _tensor(ckpt: Checkpoint, key: str, index: tuple | None = None, shape=None) -> ir.Tensor:
    info = ckpt.info(key)
    if shape is None:
        shape = info.shape
    return ir.Tensor(tuple(shape), info.dtype, ir.Load(ckpt, key, index))


def _optional(ckpt: Checkpoint, key: str) -> ir.Tensor | None:
    return _tensor(ckpt, key) if key in ckpt else None


def _mlp(ckpt: Checkpoint, prefix: str) -> ir.Expert:
    return ir.Expert(_tensor(ckpt, f"{prefix}gate_proj.weight"),
                     _tensor(ckpt, f"{prefix}up_proj.weight"),
                     _tensor(ckpt, f"{prefix}down_proj.weight"))


def _experts(ckpt: Checkpoint, prefix: str, n: int) -> tuple[ir.Expert, ...]:
    """Per-expert handles from either the classic per-expert keys or fused 3-D tensors."""
    fused = f"{prefix}experts.gate_up_proj"
    if fused in ckpt:
        shape = ckpt.info(fused).shape
        down_shape = ckpt.info(f"{prefix}experts.down_proj").shape
        if len(shape) != 3 or shape[0] != n or shape[1] % 2:
            raise UserError(f"{ckpt.path}: {fused} has shape {shape}, expected ({n}, 2*ffn, hidden)")
        f, d = shape[1] // 2, shape[2]
        if tuple(down_shape) != (n, d, f):
            raise UserError(f"{ckpt.path}: {prefix}experts.down_proj has shape {down_shape}, "
                            f"expected {(n, d, f)}")
        return tuple(
            ir.Expert(
                _tensor(ckpt, fused, (e, slice(0, f)), (f, d)),
                _tensor(ckpt, fused, (e, slice(f, 2 * f)), (f, d)),
                _tensor(ckpt, f"{prefix}experts.down_proj", (e,), (d, f)),
            )
            for e in range(n)
        )
    names = ("w1", "w3", "w2") if f"{prefix}experts.0.w1.weight" in ckpt else (
        "gate_proj", "up_proj", "down_proj")
    return tuple(
        ir.Expert(*(_tensor(ckpt, f"{prefix}experts.{e}.{name}.weight") for name in names))
        for e in range(n)
    )


def _moe_prefix(ckpt: Checkpoint, layer: str) -> str:
    for sub in ("mlp.", "block_sparse_moe."):
        if f"{layer}{sub}gate.weight" in ckpt:
            return f"{layer}{sub}"
    raise UserError(f"{ckpt.path}: tensor '{layer}mlp.gate.weight' (the router) is missing "
                    "from the checkpoint")


def _is_moe_layer(family: Family, config: dict, i: int) -> bool:
    if not family.sparse_step:
        return True
    step = config.get("decoder_sparse_step", 1) or 1
    return i not in (config.get("mlp_only_layers") or []) and (i + 1) % step == 0


def build_model(ckpt: Checkpoint) -> ir.Model:
    """Name every tensor of the checkpoint as an IR node; read no data."""
    cfg, where = ckpt.config, ckpt.path
    family = detect_family(cfg, where)
    _check_supported_options(family, cfg, where)
    d = int(_get(cfg, "hidden_size", where))
    n_heads = int(_get(cfg, "num_attention_heads", where))
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or d // n_heads)
    n_layers = int(_get(cfg, "num_hidden_layers", where))
    # transformers 5 writes num_local_experts for every family; older configs say num_experts
    n_experts = int(_get(cfg, "num_local_experts", where, cfg.get("num_experts")))
    top_k = int(_get(cfg, "num_experts_per_tok", where))
    norm_topk = True if family.norm_topk_default is None else bool(
        cfg.get("norm_topk_prob", family.norm_topk_default))
    clip = cfg.get("clip_qkv")

    embed = _tensor(ckpt, "model.embed_tokens.weight")
    if "lm_head.weight" in ckpt:
        lm_head = _tensor(ckpt, "lm_head.weight")
    elif cfg.get("tie_word_embeddings", False):
        lm_head = embed
    else:
        raise UserError(f"{where}: tensor 'lm_head.weight' is missing from the checkpoint")

    blocks = []
    for i in range(n_layers):
        layer = f"model.layers.{i}."
        att = f"{layer}self_attn."
        attn = ir.Attention(
            n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
            q=_tensor(ckpt, f"{att}q_proj.weight"), k=_tensor(ckpt, f"{att}k_proj.weight"),
            v=_tensor(ckpt, f"{att}v_proj.weight"), o=_tensor(ckpt, f"{att}o_proj.weight"),
            q_bias=_optional(ckpt, f"{att}q_proj.bias"), k_bias=_optional(ckpt, f"{att}k_proj.bias"),
            v_bias=_optional(ckpt, f"{att}v_proj.bias"),
            qk_norm=family.qk_norm,
            q_norm=_tensor(ckpt, f"{att}q_norm.weight") if family.qk_norm != "none" else None,
            k_norm=_tensor(ckpt, f"{att}k_norm.weight") if family.qk_norm != "none" else None,
            clip_qkv=float(clip) if clip is not None else None,
        )
        if f"{att}o_proj.bias" in ckpt:
            raise UserError(f"{where}: attention output bias is not supported")
        if _is_moe_layer(family, cfg, i):
            moe = _moe_prefix(ckpt, layer)
            shared = None
            if family.shared_expert and f"{moe}shared_expert.gate_proj.weight" in ckpt:
                gate = _optional(ckpt, f"{moe}shared_expert_gate.weight")
                shared = ir.SharedExpert(_mlp(ckpt, f"{moe}shared_expert."), gate)
            ffn = ir.MoE(router=ir.Router(_tensor(ckpt, f"{moe}gate.weight")),
                         experts=_experts(ckpt, moe, n_experts), top_k=top_k,
                         norm_topk=norm_topk, shared=shared)
        else:
            ffn = ir.Dense(_mlp(ckpt, f"{layer}mlp."))
        blocks.append(ir.Block(attn_norm=_tensor(ckpt, f"{layer}input_layernorm.weight"),
                               attn=attn,
                               ffn_norm=_tensor(ckpt, f"{layer}post_attention_layernorm.weight"),
                               ffn=ffn))

    model = ir.Model(
        family=family.name, hidden=d, vocab=embed.shape[0],
        context_length=int(cfg.get("max_position_embeddings") or 4096),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=ir.Rope(theta=_rope_theta(cfg), dim=head_dim),
        embed=embed, blocks=tuple(blocks), final_norm=_tensor(ckpt, "model.norm.weight"),
        lm_head=lm_head, tokenizer=_tokenizer_info(where, cfg), source=str(where),
    )
    if not any(isinstance(b.ffn, ir.MoE) for b in model.blocks):
        raise UserError(f"{where}: no MoE layer found; moecompile compiles Mixture-of-Experts models")
    return ir.verify(model)
