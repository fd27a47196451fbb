"""The intermediate representation: a structured MoE model whose weights are lazy handles.

The IR sits at the level where MoE compression is reasoned about — blocks, attention, routers,
experts, shared experts — not at the level of individual matmuls. Every weight is a `Tensor`
handle (shape, dtype, recipe); its data is produced only when `Tensor.value()` is called, so a
pipeline of passes over a 100 GB checkpoint costs nothing until an exporter streams it out.

Passes return new IR objects (dataclasses.replace) and append to `Model.history`; `verify`
checks the invariants every exporter relies on and runs after every pass.

Weight types are IR data too: `Model.types` maps IR tensor paths ("blocks.0.attn.q",
"lm_head", ...) to the type a target stores them in ("q4_k", "int4", "f32", ...). Paths, not
tensor handles, are the key: a tied embedding is one handle at two paths ("embed" and
"lm_head"), and a target may store the two differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from .errors import UserError

# ----------------------------------------------------------------------------------- tensors


class Recipe:
    """How a tensor's data is produced. Subclasses are small and side-effect free."""

    def evaluate(self) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Tensor:
    """A lazy weight: shape and dtype are known, data is computed on demand."""

    shape: tuple[int, ...]
    dtype: str  # "f32" | "f16" | "bf16": the dtype of the data as stored in the source
    recipe: Recipe

    def value(self) -> torch.Tensor:
        out = self.recipe.evaluate()
        if tuple(out.shape) != self.shape:
            raise AssertionError(f"{self.recipe.describe()}: produced {tuple(out.shape)}, "
                                 f"declared {self.shape}")
        return out

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, eq=False)
class Load(Recipe):
    """Read `key` (or `index` of it) from a checkpoint, through its memory map."""

    source: object  # frontend.checkpoint.Checkpoint
    key: str
    index: tuple | None = None

    def evaluate(self) -> torch.Tensor:
        return self.source.read(self.key, self.index)

    def describe(self) -> str:
        if self.index is None:
            return self.key
        parts = []
        for i in self.index:
            parts.append(f"{i.start or ''}:{i.stop or ''}" if isinstance(i, slice) else str(i))
        return f"{self.key}[{','.join(parts)}]"


@dataclass(frozen=True, eq=False)
class Rows(Recipe):
    """Selected rows of a tensor, in the given order (a pruned router keeps its experts' rows)."""

    base: Tensor
    rows: tuple[int, ...]

    def evaluate(self) -> torch.Tensor:
        return self.base.value()[list(self.rows)]

    def describe(self) -> str:
        return f"rows({self.base.recipe.describe()}, {list(self.rows)})"


@dataclass(frozen=True, eq=False)
class Combine(Recipe):
    """A linear combination sum_i coeffs[i] * parts[i], in float32 (merged experts)."""

    parts: tuple[Tensor, ...]
    coeffs: tuple[float, ...]

    def evaluate(self) -> torch.Tensor:
        out = None
        for c, part in zip(self.coeffs, self.parts):
            term = part.value().to(torch.float32) * c
            out = term if out is None else out + term
        return out

    def describe(self) -> str:
        return "combine(" + ", ".join(f"{c:+.3g}*{p.recipe.describe()}"
                                      for c, p in zip(self.coeffs, self.parts)) + ")"


@dataclass(frozen=True, eq=False)
class MixRows(Recipe):
    """matrix @ base: each new row a linear combination of the base's rows (a router whose
    expert logits are adjusted linearly, which any runtime's linear router can hold)."""

    base: Tensor
    matrix: tuple[tuple[float, ...], ...]

    def evaluate(self) -> torch.Tensor:
        return torch.tensor(self.matrix, dtype=torch.float32) @ self.base.value().to(torch.float32)

    def describe(self) -> str:
        return f"mix_rows({self.base.recipe.describe()}, {len(self.matrix)}x{len(self.matrix[0])})"


@dataclass(frozen=True, eq=False)
class Columns(Recipe):
    """Selected columns of a 2-D tensor, in the given order (a slimmed expert's down
    projection keeps the columns of its kept neurons)."""

    base: Tensor
    columns: tuple[int, ...]

    def evaluate(self) -> torch.Tensor:
        return self.base.value()[:, list(self.columns)]

    def describe(self) -> str:
        return f"columns({self.base.recipe.describe()}, {len(self.columns)} of {self.base.shape[1]})"


@dataclass(frozen=True, eq=False)
class MixColumns(Recipe):
    """base @ matrix, in float32: each new column a linear combination of the base's columns
    (a down projection refitted by least squares onto the neurons an expert keeps; the
    matrix comes from calibration statistics, the base is read only when this is evaluated)."""

    base: Tensor
    matrix: torch.Tensor  # (base columns, new columns), float32; never modified

    def evaluate(self) -> torch.Tensor:
        return self.base.value().to(torch.float32) @ self.matrix

    def describe(self) -> str:
        rows, cols = self.matrix.shape
        return f"mix_columns({self.base.recipe.describe()}, {rows}x{cols})"


def rows_of(base: Tensor, rows: list[int]) -> Tensor:
    return Tensor((len(rows), *base.shape[1:]), base.dtype, Rows(base, tuple(rows)))


def columns_of(base: Tensor, columns: list[int]) -> Tensor:
    return Tensor((base.shape[0], len(columns)), base.dtype, Columns(base, tuple(columns)))


def mixed_columns(base: Tensor, matrix: torch.Tensor) -> Tensor:
    """base @ matrix as a lazy float32 tensor (matrix: (base columns, new columns))."""
    matrix = matrix.detach().to(torch.float32).clone()
    if matrix.dim() != 2 or matrix.shape[0] != base.shape[1]:
        raise ValueError(f"a {tuple(matrix.shape)} matrix cannot mix the columns of {base.shape}")
    return Tensor((base.shape[0], matrix.shape[1]), "f32", MixColumns(base, matrix))


def combined(parts: list[Tensor], coeffs: list[float]) -> Tensor:
    """The weighted sum of same-shaped tensors; a single part with weight 1 is returned as is,
    so pure pruning keeps the source's handles (and its dtype) untouched."""
    pairs = [(c, p) for c, p in zip(coeffs, parts) if c != 0.0]
    if len(pairs) == 1 and pairs[0][0] == 1.0:
        return pairs[0][1]
    if not pairs:
        raise ValueError("a combination needs at least one non-zero coefficient")
    return Tensor(parts[0].shape, "f32", Combine(tuple(p for _, p in pairs),
                                                 tuple(float(c) for c, _ in pairs)))


# ----------------------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class Rope:
    theta: float
    dim: int  # rotated dimensions per head (== head_dim for every supported family)
    style: str = "neox"  # HF rotate_half pairing (i, i + d/2)


@dataclass(frozen=True)
class Attention:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    q: Tensor  # (n_heads*head_dim, hidden)
    k: Tensor  # (n_kv_heads*head_dim, hidden)
    v: Tensor
    o: Tensor  # (hidden, n_heads*head_dim)
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    # q/k RMSNorm: "head" normalises each head (Qwen3), "full" the whole projection (OLMoE)
    qk_norm: str = "none"
    q_norm: Tensor | None = None
    k_norm: Tensor | None = None
    clip_qkv: float | None = None


@dataclass(frozen=True)
class Expert:
    """One SwiGLU expert: down(silu(gate x) * up x). Its width (intermediate neurons) is its
    own: slimming may leave the experts of one layer at different widths, which a target
    holds or refuses (GGUF: one width per model; ONNX's portable form: one per expert)."""

    gate: Tensor  # (ffn, hidden)
    up: Tensor  # (ffn, hidden)
    down: Tensor  # (hidden, ffn)

    @property
    def width(self) -> int:
        return self.gate.shape[0]


@dataclass(frozen=True)
class SharedExpert:
    """An always-on expert; with `gate`, its output is scaled by sigmoid(gate · x) (Qwen2-MoE)."""

    mlp: Expert
    gate: Tensor | None = None  # (1, hidden)


@dataclass(frozen=True)
class Router:
    weight: Tensor  # (n_experts, hidden): one row per expert, in expert order


@dataclass(frozen=True)
class MoE:
    router: Router
    experts: tuple[Expert, ...]
    top_k: int
    norm_topk: bool  # renormalise the top-k probabilities to sum to 1
    scoring: str = "softmax"
    shared: SharedExpert | None = None
    # EEP's exact router: the softmax over the router's own rows (the original experts) is
    # mapped to one weight per expert by this (n_experts x router rows) matrix before top-k.
    # None: the router has one row per expert (the form every runtime's MoE graph has).
    router_map: tuple[tuple[float, ...], ...] | None = None

    @property
    def n_experts(self) -> int:
        return len(self.experts)


@dataclass(frozen=True)
class Dense:
    mlp: Expert


FFN = Union[MoE, Dense]


@dataclass(frozen=True)
class Block:
    attn_norm: Tensor
    attn: Attention
    ffn_norm: Tensor | None  # None together with ffn: the FFN sublayer was dropped
    ffn: FFN | None


@dataclass(frozen=True)
class Tokenizer:
    """Where the tokenizer lives and the special ids the model was trained with."""

    path: object  # folder with tokenizer.json / tokenizer.model
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False


@dataclass(frozen=True)
class Model:
    family: str  # "mixtral" | "qwen2_moe" | "qwen3_moe" | "olmoe"
    hidden: int
    vocab: int
    context_length: int
    norm_eps: float
    rope: Rope
    embed: Tensor  # (vocab, hidden)
    blocks: tuple[Block, ...]
    final_norm: Tensor
    lm_head: Tensor  # (vocab, hidden); the embedding's handle when tied
    tokenizer: Tokenizer | None = None
    source: str = ""
    history: tuple[dict, ...] = field(default_factory=tuple)
    # IR path -> weight type in the target's vocabulary; empty until a target chooses them.
    # Never mutated: `with_types` returns a new model.
    types: dict[str, str] = field(default_factory=dict)

    def tensors(self) -> list[tuple[str, Tensor]]:
        """Every weight with a readable path, in a stable order."""
        out = [("embed", self.embed)]
        for i, b in enumerate(self.blocks):
            for name, t in _node_tensors(f"blocks.{i}", b):
                out.append((name, t))
        out += [("final_norm", self.final_norm), ("lm_head", self.lm_head)]
        return out

    def tensor_map(self) -> dict[str, Tensor]:
        """IR path -> tensor (a tied head appears under both of its paths)."""
        return dict(self.tensors())

    def with_history(self, entry: dict) -> "Model":
        from dataclasses import replace

        return replace(self, history=self.history + (entry,))

    def with_types(self, types: dict[str, str]) -> "Model":
        from dataclasses import replace

        return replace(self, types=dict(types))


def _node_tensors(prefix: str, node) -> list[tuple[str, Tensor]]:
    out = []
    for name in node.__dataclass_fields__:
        value = getattr(node, name)
        path = f"{prefix}.{name}"
        if isinstance(value, Tensor):
            out.append((path, value))
        elif isinstance(value, tuple) and value and hasattr(value[0], "__dataclass_fields__"):
            for i, item in enumerate(value):
                out += _node_tensors(f"{path}.{i}", item)
        elif hasattr(value, "__dataclass_fields__") and not isinstance(value, (Rope, Tokenizer)):
            out += _node_tensors(path, value)
    return out


# ----------------------------------------------------------------------------------- verifier


class IRError(UserError):
    """The IR broke an invariant. Raised while reading a checkpoint it is bad input (exit 2);
    the pass manager turns one raised after a pass into an internal error naming the pass."""


def verify(model: Model) -> Model:
    """Check shapes and MoE invariants; raise IRError naming every problem found."""
    problems: list[str] = []

    def expect(t: Tensor | None, shape: tuple, what: str):
        if t is None:
            problems.append(f"{what}: missing")
        elif tuple(t.shape) != tuple(shape):
            problems.append(f"{what}: shape {t.shape}, expected {shape}")

    d, v = model.hidden, model.vocab
    expect(model.embed, (v, d), "embed")
    expect(model.lm_head, (v, d), "lm_head")
    expect(model.final_norm, (d,), "final_norm")
    if not model.blocks:
        problems.append("model has no blocks")
    for i, b in enumerate(model.blocks):
        at = f"block {i}"
        a = b.attn
        expect(b.attn_norm, (d,), f"{at} attn_norm")
        if b.ffn is not None or b.ffn_norm is not None:
            expect(b.ffn_norm, (d,), f"{at} ffn_norm")
        if a.n_heads % a.n_kv_heads:
            problems.append(f"{at}: {a.n_heads} heads not divisible by {a.n_kv_heads} kv heads")
        qd, kd = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        expect(a.q, (qd, d), f"{at} q")
        expect(a.k, (kd, d), f"{at} k")
        expect(a.v, (kd, d), f"{at} v")
        expect(a.o, (d, qd), f"{at} o")
        for name, size in (("q_bias", qd), ("k_bias", kd), ("v_bias", kd)):
            if getattr(a, name) is not None:
                expect(getattr(a, name), (size,), f"{at} {name}")
        if a.qk_norm == "head":
            expect(a.q_norm, (a.head_dim,), f"{at} q_norm")
            expect(a.k_norm, (a.head_dim,), f"{at} k_norm")
        elif a.qk_norm == "full":
            expect(a.q_norm, (qd,), f"{at} q_norm")
            expect(a.k_norm, (kd,), f"{at} k_norm")
        elif a.qk_norm != "none":
            problems.append(f"{at}: unknown qk_norm '{a.qk_norm}'")
        ffn = b.ffn
        if isinstance(ffn, MoE):
            e = ffn.n_experts
            if e < 1:
                problems.append(f"{at}: MoE without experts")
                continue
            if not 1 <= ffn.top_k <= e:
                problems.append(f"{at}: top_k {ffn.top_k} outside 1..{e} experts")
            if ffn.router_map is None:
                expect(ffn.router.weight, (e, d), f"{at} router")
            else:
                rows = ffn.router.weight.shape[0]
                expect(ffn.router.weight, (rows, d), f"{at} router")
                if len(ffn.router_map) != e or any(len(r) != rows for r in ffn.router_map):
                    problems.append(f"{at}: router map is not {e} x {rows}")
            for j, ex in enumerate(ffn.experts):
                _expect_mlp(expect, ex, d, ex.gate.shape[0], f"{at} expert {j}")
            if ffn.shared is not None:
                fs = ffn.shared.mlp.gate.shape[0]
                _expect_mlp(expect, ffn.shared.mlp, d, fs, f"{at} shared expert")
                if ffn.shared.gate is not None:
                    expect(ffn.shared.gate, (1, d), f"{at} shared expert gate")
        elif isinstance(ffn, Dense):
            _expect_mlp(expect, ffn.mlp, d, ffn.mlp.gate.shape[0], f"{at} dense mlp")
        elif ffn is not None:
            problems.append(f"{at}: unknown ffn {type(ffn).__name__}")
    if model.types:
        stray = sorted(set(model.types) - {name for name, _ in model.tensors()})
        if stray:
            problems.append(f"weight types for paths the model does not have: {stray[:3]}")
    if problems:
        raise IRError("invalid IR: " + "; ".join(problems))
    return model


def _expect_mlp(expect: Callable, mlp: Expert, d: int, f: int, what: str) -> None:
    if f < 1:
        expect(mlp.gate, (1, d), f"{what} gate (an MLP keeps at least one neuron)")
    expect(mlp.gate, (f, d), f"{what} gate")
    expect(mlp.up, (f, d), f"{what} up")
    expect(mlp.down, (d, f), f"{what} down")


# ----------------------------------------------------------------------------------- printing


def format_ir(model: Model) -> str:
    """A readable summary: one line per block plus the model-wide settings."""
    lines = [
        f"model {model.family}  source={model.source}",
        f"  hidden={model.hidden} vocab={model.vocab} context={model.context_length} "
        f"norm_eps={model.norm_eps:g} rope(theta={model.rope.theta:g}, dim={model.rope.dim}, "
        f"{model.rope.style})",
        f"  embed {_fmt(model, 'embed', model.embed)}   lm_head "
        f"{_fmt(model, 'lm_head', model.lm_head)}"
        + ("  (tied)" if model.lm_head is model.embed else ""),
    ]
    for i, b in enumerate(model.blocks):
        a = b.attn
        attn = (f"attn heads={a.n_heads} kv={a.n_kv_heads} head_dim={a.head_dim}"
                + (f" qk_norm={a.qk_norm}" if a.qk_norm != "none" else "")
                + (" bias" if a.q_bias is not None else "")
                + f" [{_types(model, f'blocks.{i}.attn.', a.q.dtype)}]")
        ffn = b.ffn
        if isinstance(ffn, MoE):
            widths = sorted({ex.width for ex in ffn.experts})
            f = str(widths[0]) if len(widths) == 1 else f"{widths[0]}..{widths[-1]}"
            desc = (f"moe experts={ffn.n_experts} top_k={ffn.top_k} ffn={f} {ffn.scoring}"
                    f"{' renorm' if ffn.norm_topk else ''} "
                    f"[{_types(model, f'blocks.{i}.ffn.experts.', ffn.experts[0].gate.dtype)}]")
            if ffn.router_map is not None:
                desc += f" router-map {ffn.n_experts}x{ffn.router.weight.shape[0]}"
            if ffn.shared is not None:
                desc += (f" + shared ffn={ffn.shared.mlp.gate.shape[0]}"
                         + (" sigmoid-gated" if ffn.shared.gate is not None else "")
                         + (f" [{_types(model, f'blocks.{i}.ffn.shared.mlp.', '')}]"
                            if model.types else ""))
        elif ffn is None:
            desc = "no ffn (MoE sublayer dropped)"
        else:
            desc = (f"dense ffn={ffn.mlp.gate.shape[0]} "
                    f"[{_types(model, f'blocks.{i}.ffn.mlp.', ffn.mlp.gate.dtype)}]")
        lines.append(f"  block {i:>3}: {attn} | {desc}")
    for entry in model.history:
        lines.append(f"  pass {entry.get('pass')}: "
                     + ", ".join(f"{k}={v}" for k, v in entry.items() if k != "pass"))
    return "\n".join(lines)


_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")


def _fmt(model: Model, path: str, t: Tensor) -> str:
    stored = f" -> {model.types[path]}" if path in model.types else ""
    return f"{'x'.join(map(str, t.shape))} {t.dtype}{stored}"


def _types(model: Model, prefix: str, dtype: str) -> str:
    """The source dtype of a node, and once types are chosen the types of its matrices
    (several when they differ, e.g. 'bf16 -> q4_k/q6_k'); routers are left out."""
    chosen = sorted({t for p, t in model.types.items() if p.startswith(prefix)
                     and p.rsplit(".", 1)[-1] in _MATRICES})
    if not chosen:
        return dtype
    return f"{dtype} -> {'/'.join(chosen)}" if dtype else "/".join(chosen)
