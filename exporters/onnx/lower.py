"""IR → ONNX decoder with a KV cache, for ONNX Runtime (and any ONNX runtime in portable form).

The graph has the interface optimum and onnxruntime-genai drive:
inputs `input_ids` [batch, seq], `attention_mask` [batch, past + seq], `position_ids`
[batch, seq], `past_key_values.N.key/value` [batch, kv_heads, past, head_dim]; outputs
`logits` [batch, seq, vocab] and `present.N.key/value` [batch, kv_heads, past + seq, head_dim].
Keys are cached after RoPE. It is built from the IR node by node, so whatever the passes did
(pruned or merged experts, EEP's exact router map, fewer active experts, dropped blocks or MoE
sublayers) is what the graph computes, operation for operation as the reference executor does.

MoE layers have two lowerings (`moe=`):
- "portable": standard ops only — softmax router (and router map), TopK, then per expert
  Equal → NonZero → Gather → SwiGLU → ScatterND(add) over the tokens routed to it;
- "ort": ONNX Runtime's fused `com.microsoft.MoE` (float) / `QMoE` (int4/int8) kernels, gate and
  up rows interleaved for `swiglu_fusion=1` (the only form ORT's CPU kernels take). A layer the
  fused op cannot compute exactly (a router map; experts of mixed precision; experts of
  different widths, which its stacked weights cannot hold) keeps the portable lowering, and the
  result says which layers did. Each layer may have its own expert width in either form.

Weights are float32, or blocked int4/int8 (quant.py) per IR tensor as `Model.types` says — per
expert where the portable lowering holds the experts — as `DequantizeLinear → MatMul`. Past
`external_at` bytes every weight goes to one `<name>.data` file beside the model.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from tqdm import tqdm

from moecompile import ir
from moecompile.errors import UserError
from moecompile.runtime.executor import rope_tables

from . import quant as oq
from .graph import Graph

EXTERNAL_AT = 1_800_000_000  # bytes of weights beyond which they go to external data (2 GB cap)
MOE_LOWERINGS = ("portable", "ort")
F32 = TensorProto.FLOAT


@dataclass
class OnnxExport:
    path: Path
    data_path: Path | None  # the external data file, when one was written
    lowering: dict[int, str]  # layer -> "portable" | "ort" (MoE layers only)
    quant: dict[str, str]  # IR tensor path -> "int4" | "int8"
    weight_bytes: int
    tensors: list[dict]  # every weight initializer: name, type, shape, bytes


def check_exportable(model: ir.Model) -> None:
    for i, b in enumerate(model.blocks):
        if isinstance(b.ffn, ir.MoE) and b.ffn.scoring != "softmax":
            raise UserError(f"layer {i}: '{b.ffn.scoring}' routing has no ONNX lowering yet")
        if b.attn.head_dim % 2 or model.rope.dim != b.attn.head_dim:
            raise UserError(f"layer {i}: rope over {model.rope.dim} of {b.attn.head_dim} head "
                            "dimensions has no ONNX lowering yet")


def quantized(model: ir.Model) -> dict[str, str]:
    """IR path -> "int8"/"int4" for the weights `Model.types` stores as blocked integers."""
    return {p: kind for p, kind in model.types.items() if kind in oq.TYPES}


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the weight initializers `export` writes for the model's types: every IR tensor
    (a head tied to the embedding twice: gathered rows and the transposed head), the RoPE
    tables and EEP router maps."""
    quant = quantized(model)
    total = 2 * 4 * model.context_length * model.rope.dim
    for path, t in model.tensors():
        total += oq.stored_bytes(t.numel, quant.get(path))
    for b in model.blocks:
        if isinstance(b.ffn, ir.MoE) and b.ffn.router_map is not None:
            total += 4 * len(b.ffn.router_map) * len(b.ffn.router_map[0])
    return total


def export(model: ir.Model, path: Path, moe: str = "portable", progress: bool = True,
           external_at: int = EXTERNAL_AT) -> OnnxExport:
    """Write `path` (and `path`.data past `external_at` bytes), each linear weight in its IR
    type ("int8"/"int4" blocks, float32 otherwise)."""
    assert moe in MOE_LOWERINGS, moe
    check_exportable(model)
    quant = quantized(model)
    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    external = weight_bytes(model) > external_at
    data_path.unlink(missing_ok=True)
    bar = tqdm(total=len(model.tensors()), desc="onnx export", unit="tensor",
               disable=not progress)
    try:
        with (open(data_path, "wb") if external else nullcontext()) as data:
            lower = _Lowering(model, Graph(data if external else None, data_path.name), quant,
                              bar)
            proto = lower.build(moe)
            onnx.save_model(proto, str(path))
    except BaseException:
        data_path.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return OnnxExport(path, data_path if external else None, lower.lowering, quant,
                      lower.g.weight_bytes, lower.g.written)


class _Lowering:
    def __init__(self, model: ir.Model, g: Graph, quant: dict[str, str], bar):
        self.m, self.g, self.quant, self.bar = model, g, quant, bar
        self.tensors = model.tensor_map()
        self.lowering: dict[int, str] = {}
        self.written: set[str] = set()

    # ---------------------------------------------------------------- weights
    def _value(self, path: str) -> np.ndarray:
        return self.tensors[path].value().to(torch.float32).numpy()

    def _done(self, path: str) -> None:
        if path not in self.written:
            self.written.add(path)
            self.bar.update(1)

    def tensor(self, path: str) -> str:
        """A float32 initializer as stored (norms, biases, routers, the embedding)."""
        self._done(path)
        return self.g.weight(path, self._value(path))

    def linear(self, x: str, path: str, bias: str | None = None) -> str:
        """x @ W^T (+ b): W^T float32, or blocked int8/int4 through DequantizeLinear."""
        name = path
        w = self._value(path)
        kind = self.quant.get(path)
        if kind is None:
            y = self.g.op("MatMul", x, self.g.weight(name, np.ascontiguousarray(w.T)),
                          name=name)
        else:
            blocked = oq.quantize(w, oq.TYPES[kind])
            codes_t = np.ascontiguousarray(blocked.codes.T)  # (in, out), blocks along axis 0
            if kind == "int4":
                codes = self.g.weight(name + ".q", oq.pack_int4(codes_t),
                                      TensorProto.INT4, codes_t.shape)
            else:
                codes = self.g.weight(name + ".q", codes_t)
            scales = self.g.weight(name + ".scales",
                                   np.ascontiguousarray(blocked.scales.T))
            wt = self.g.op("DequantizeLinear", codes, scales, name=name + ".dq", axis=0,
                           block_size=oq.BLOCK)
            y = self.g.op("MatMul", x, wt, name=name)
        self._done(path)
        if bias is not None:
            y = self.g.op("Add", y, self.tensor(bias), name=name + ".bias")
        return y

    # ---------------------------------------------------------------- graph
    def build(self, moe: str) -> onnx.ModelProto:
        g, m = self.g, self.m
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                ["batch_size", "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                                ["batch_size", "sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", F32, ["batch_size", "sequence_length", m.vocab])]
        for i, b in enumerate(m.blocks):
            kv = [b.attn.n_kv_heads, b.attn.head_dim]
            for which in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{which}", F32, ["batch_size", kv[0], "past_sequence_length", kv[1]]))
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{which}", F32, ["batch_size", kv[0], "total_sequence_length", kv[1]]))
        h = g.op("Gather", self.tensor("embed"), "input_ids", name="embed")
        mask = self.attention_mask()
        cos, sin = self.rope(m)
        for i, block in enumerate(m.blocks):
            x = self.rms_norm(h, f"blocks.{i}.attn_norm")
            h = g.op("Add", h, self.attention(i, block.attn, x, mask, cos, sin), name=f"blocks.{i}.attn_residual")
            if block.ffn is None:
                continue
            x = self.rms_norm(h, f"blocks.{i}.ffn_norm")
            if isinstance(block.ffn, ir.MoE):
                y = self.moe(i, block.ffn, x, moe)
            else:
                y = self.mlp(x, f"blocks.{i}.ffn.mlp")
            h = g.op("Add", h, y, name=f"blocks.{i}.ffn_residual")
        h = self.rms_norm(h, "final_norm")
        logits = self.linear(h, "lm_head")
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits/op"))
        return g.model(inputs, outputs, doc=f"moecompile export of {m.source}")

    def rms_norm(self, x: str, name: str) -> str:
        """x / sqrt(mean(x^2) + eps) * w — the pattern ORT fuses into SimplifiedLayerNorm."""
        g = self.g
        ms = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32), name=name + ".sq"),
                  g.const([-1]), keepdims=1, name=name + ".ms")
        rms = g.op("Sqrt", g.op("Add", ms, g.const(self.m.norm_eps, np.float32), name=name + ".eps"),
                   name=name + ".rms")
        return g.op("Mul", g.op("Div", x, rms, name=name + ".div"), self.tensor(name), name=name)

    def attention_mask(self) -> str:
        """[batch, 1, 1, seq, total] bool: key j visible to query i (at past + i) when j <= past + i
        and attention_mask[j] is 1."""
        g = self.g
        total = g.op("Gather", g.op("Shape", "attention_mask"), g.const(1), axis=0, name="total_len")
        seq = g.op("Gather", g.op("Shape", "input_ids"), g.const(1), axis=0, name="seq_len")
        past = g.op("Sub", total, seq, name="past_len")
        q_pos = g.op("Range", past, total, g.const(1), name="q_pos")
        k_pos = g.op("Range", g.const(0), total, g.const(1), name="k_pos")
        causal = g.op("LessOrEqual", g.op("Unsqueeze", k_pos, g.const([0])),
                      g.op("Unsqueeze", q_pos, g.const([1])), name="causal")
        padding = g.op("Reshape", g.op("Cast", "attention_mask", to=TensorProto.BOOL),
                       g.const([0, 1, 1, 1, -1]), name="key_mask")
        return g.op("And", causal, padding, name="mask")

    def rope(self, m: ir.Model) -> tuple[str, str]:
        positions = torch.arange(m.context_length)[None]
        cos, sin = rope_tables(positions, m.rope, "cpu")  # the executor's own tables
        g = self.g
        tables = []
        for name, table in (("cos", cos), ("sin", sin)):
            t = g.weight(f"rope.{name}", table[0, 0].numpy().astype(np.float32))
            # [batch, 1, seq, dim]: broadcast over heads (and kv groups after a reshape)
            tables.append(g.op("Unsqueeze", g.op("Gather", t, "position_ids"), g.const([1]),
                               name=f"rope.{name}"))
        return tables[0], tables[1]

    def _rotate(self, x: str, cos: str, sin: str, dim: int, name: str) -> str:
        g = self.g
        x1, x2 = g.op("Split", x, g.const([dim // 2, dim // 2]), axis=-1, outputs=2, name=name + ".half")
        rotated = g.op("Concat", g.op("Neg", x2, name=name + ".neg"), x1, axis=-1, name=name + ".rot")
        return g.op("Add", g.op("Mul", x, cos, name=name + ".cos"),
                    g.op("Mul", rotated, sin, name=name + ".sin"), name=name + ".rope")

    def attention(self, i: int, a: ir.Attention, x: str, mask: str, cos: str, sin: str) -> str:
        g, p = self.g, f"blocks.{i}.attn"
        bias = lambda which: f"{p}.{which}_bias" if getattr(a, f"{which}_bias") is not None else None
        q = self.linear(x, p + ".q", bias("q"))
        k = self.linear(x, p + ".k", bias("k"))
        v = self.linear(x, p + ".v", bias("v"))
        if a.qk_norm == "full":
            q = self.rms_norm(q, p + ".q_norm")
            k = self.rms_norm(k, p + ".k_norm")
        if a.clip_qkv is not None:
            lo, hi = g.const(-a.clip_qkv, np.float32), g.const(a.clip_qkv, np.float32)
            q, k, v = (g.op("Clip", z, lo, hi, name=f"{p}.clip") for z in (q, k, v))
        heads = lambda z, n, what: g.op("Reshape", z, g.const([0, 0, n, a.head_dim]), name=f"{p}.{what}.heads")
        q, k, v = heads(q, a.n_heads, "q"), heads(k, a.n_kv_heads, "k"), heads(v, a.n_kv_heads, "v")
        if a.qk_norm == "head":
            q = self.rms_norm(q, p + ".q_norm")
            k = self.rms_norm(k, p + ".k_norm")
        bhsd = lambda z, what: g.op("Transpose", z, perm=[0, 2, 1, 3], name=f"{p}.{what}.bhsd")
        q = self._rotate(bhsd(q, "q"), cos, sin, a.head_dim, p + ".q")
        k = self._rotate(bhsd(k, "k"), cos, sin, a.head_dim, p + ".k")
        v = bhsd(v, "v")
        k = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, outputs=[f"present.{i}.key"])
        v = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, outputs=[f"present.{i}.value"])
        group = a.n_heads // a.n_kv_heads
        # queries as [batch, kv_heads, group, seq, dim] against [batch, kv_heads, 1, total, dim]
        q5 = g.op("Reshape", q, g.const([0, a.n_kv_heads, group, -1, a.head_dim]), name=p + ".q.groups")
        k5 = g.op("Unsqueeze", k, g.const([2]), name=p + ".k.groups")
        v5 = g.op("Unsqueeze", v, g.const([2]), name=p + ".v.groups")
        scores = g.op("Mul", g.op("MatMul", q5, g.op("Transpose", k5, perm=[0, 1, 2, 4, 3]),
                                  name=p + ".qk"),
                      g.const(a.head_dim ** -0.5, np.float32), name=p + ".scores")
        scores = g.op("Where", mask, scores, g.const(np.finfo(np.float32).min, np.float32),
                      name=p + ".masked")
        out = g.op("MatMul", g.op("Softmax", scores, axis=-1, name=p + ".probs"), v5, name=p + ".pv")
        out = g.op("Reshape", out, g.const([0, a.n_heads, -1, a.head_dim]), name=p + ".heads")
        out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3], name=p + ".bshd"),
                   g.const([0, 0, a.n_heads * a.head_dim]), name=p + ".merge")
        return self.linear(out, p + ".o")

    # ---------------------------------------------------------------- feed-forward
    def mlp(self, x: str, prefix: str) -> str:
        g = self.g
        gate = self.linear(x, prefix + ".gate")
        act = g.op("Mul", gate, g.op("Sigmoid", gate), name=prefix + ".gate.silu")
        return self.linear(g.op("Mul", act, self.linear(x, prefix + ".up")), prefix + ".down")

    def moe(self, i: int, moe: ir.MoE, x: str, lowering: str) -> str:
        g, p = self.g, f"blocks.{i}.ffn"
        x2 = g.op("Reshape", x, g.const([-1, self.m.hidden]), name=p + ".tokens")
        logits = g.op("MatMul", x2, self.g.weight(p + ".router", np.ascontiguousarray(
            self._value(p + ".router.weight").T)), name=p + ".router")
        self._done(p + ".router.weight")
        why = self._fused_refusal(p, moe) if lowering == "ort" else "portable requested"
        if why is None:
            y, self.lowering[i] = self.fused_moe(p, moe, x2, logits), "ort"
        else:
            y, self.lowering[i] = self.portable_moe(p, moe, x2, logits), "portable"
        if moe.shared is not None:
            s = self.mlp(x2, p + ".shared.mlp")
            if moe.shared.gate is not None:
                s = g.op("Mul", s, g.op("Sigmoid", self.linear(x2, p + ".shared.gate")),
                         name=p + ".shared.gated")
            y = g.op("Add", y, s, name=p + ".shared.add")
        return g.op("Reshape", y, g.op("Shape", x), name=p + ".out")

    def _fused_refusal(self, p: str, moe: ir.MoE) -> str | None:
        if moe.router_map is not None:
            return "router map"
        if len({ex.width for ex in moe.experts}) > 1:
            return "experts of different widths"  # the fused op stacks them: one per layer
        kinds = {self.quant.get(f"{p}.experts.{e}.{w}") for e in range(moe.n_experts)
                 for w in ("gate", "up", "down")}
        if len(kinds) > 1:
            return "mixed expert precision"
        return None

    def portable_moe(self, p: str, moe: ir.MoE, x2: str, logits: str) -> str:
        g = self.g
        probs = g.op("Softmax", logits, axis=-1, name=p + ".probs")
        if moe.router_map is not None:
            mapping = np.asarray(moe.router_map, dtype=np.float32)
            probs = g.op("MatMul", probs, g.weight(p + ".router_map", np.ascontiguousarray(mapping.T)),
                         name=p + ".mapped")
        weights, idx = g.op("TopK", probs, g.const([moe.top_k]), axis=-1, outputs=2, name=p + ".topk")
        if moe.norm_topk:
            weights = g.op("Div", weights, g.op("ReduceSum", weights, g.const([-1]), keepdims=1,
                                                name=p + ".wsum"), name=p + ".renorm")
        out = g.op("ConstantOfShape", g.op("Shape", x2), value=helper.make_tensor("zero", F32, [1], [0.0]),
                   name=p + ".zeros")
        zero = g.const(0.0, np.float32)
        for e in range(moe.n_experts):
            q = f"{p}.experts.{e}"
            hit = g.op("Equal", idx, g.const(e), name=q + ".hit")
            w_e = g.op("ReduceSum", g.op("Where", hit, weights, zero), g.const([1]), keepdims=0, name=q + ".w")
            routed = g.op("ReduceMax", g.op("Cast", hit, to=F32), g.const([1]), keepdims=0, name=q + ".any")
            tokens = g.op("Reshape", g.op("NonZero", routed), g.const([-1]), name=q + ".tokens")
            y = self.mlp(g.op("Gather", x2, tokens, axis=0, name=q + ".x"), q)
            y = g.op("Mul", y, g.op("Unsqueeze", g.op("Gather", w_e, tokens, axis=0), g.const([1])),
                     name=q + ".weighted")
            out = g.op("ScatterND", out, g.op("Unsqueeze", tokens, g.const([1])), y, reduction="add",
                       name=q + ".add")
        return out

    def fused_moe(self, p: str, moe: ir.MoE, x2: str, logits: str) -> str:
        """ORT's MoE/QMoE: router logits in, softmax + top-k (+ renormalisation) inside."""
        g = self.g
        experts = [f"{p}.experts.{e}" for e in range(moe.n_experts)]
        gate = np.stack([self._value(e + ".gate") for e in experts])  # (E, I, H)
        up = np.stack([self._value(e + ".up") for e in experts])
        down = np.stack([self._value(e + ".down") for e in experts])  # (E, H, I)
        fc1 = np.stack([gate, up], axis=2).reshape(len(moe.experts), -1, gate.shape[-1])
        attrs = dict(k=moe.top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                     activation_beta=0.0, normalize_routing_weights=int(moe.norm_topk))
        kind = self.quant.get(experts[0] + ".gate")
        for e in experts:
            for w in ("gate", "up", "down"):
                self._done(f"{e}.{w}")
        if kind is None:
            return g.op("MoE", x2, logits, g.weight(p + ".fc1", fc1), "",
                        g.weight(p + ".fc2", down), domain="com.microsoft", name=p + ".moe",
                        **attrs)
        bits = oq.TYPES[kind]
        packed = []
        for name, w in (("fc1", fc1), ("fc2", down)):
            blocked = oq.quantize(w.reshape(-1, w.shape[-1]), bits)
            codes = blocked.packed_uint().reshape(w.shape[0], w.shape[1], -1)
            scales = blocked.scales.reshape(w.shape[0], w.shape[1], -1)
            packed += [g.weight(f"{p}.{name}.q", codes), g.weight(f"{p}.{name}.scales", scales)]
        # ORT 1.32's CPU QMoE renormalises the top-k weights even with
        # normalize_routing_weights=0 (measured: wrong logits for OLMoE/Qwen2-MoE); so it always
        # renormalises here, and a family that does not is scaled back by its top-k mass
        y = g.op("QMoE", x2, logits, packed[0], packed[1], "", packed[2], packed[3],
                 domain="com.microsoft", name=p + ".qmoe", expert_weight_bits=bits,
                 block_size=oq.BLOCK, accuracy_level=oq.ACCURACY_LEVEL,
                 **{**attrs, "normalize_routing_weights": 1})
        if moe.norm_topk:
            return y
        top, _ = g.op("TopK", g.op("Softmax", logits, axis=-1, name=p + ".probs"),
                      g.const([moe.top_k]), axis=-1, outputs=2, name=p + ".topk")
        mass = g.op("ReduceSum", top, g.const([-1]), keepdims=1, name=p + ".topk_mass")
        return g.op("Mul", y, mass, name=p + ".unnormalised")
