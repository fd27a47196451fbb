"""The verifier's grid: correct exports that must pass and exports with one injected bug that
must fail, across families, weight scales and export types, in the real runtimes.

Each model is a random bf16 checkpoint with every weight N(0, scale), hidden 256 (rows k-quants
take as such), an expert FFN width of 80 (not a multiple of 32: down projections fall back as
in real files) and three layers; the louder the weights, the more rounding flips cascade.

A bug is a modified IR exported in place of the model (`BUGS`). It is judged twice:
- as compile-time verification would judge an exporter that wrote it: the runtime's logits
  against the reference computing what the *correct* file computes (for GGUF the correct
  file's stored numbers, for ONNX the unmodified model at the wrong file's types), so only the
  logit rule decides;
- as `moecompile verify FILE --against MODEL` judges it (GGUF): every check it makes.
`tools/verify_grid.py` prints the counts the README states; tests run the grid and require
none of either kind of error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .. import frontend, ir
from ..exporters.gguf import writer
from ..exporters.gguf.reader import FileNumerics
from ..exporters.gguf.target import GGUFTarget
from ..exporters.onnx.target import ONNXTarget
from ..exporters.target import TypeRequest
from ..errors import UserError, VerificationError
from ..job import compile_model
from ..runtime.llama_worker import run_llama_cpp
from ..verify import References, judge, references, verification_tokens
from .models import _vocab_size, build_random_checkpoint, tiny_config

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
SCALES = (0.02, 0.05, 0.1, 0.15, 0.2)
KINDS = ("f32", "f16", "q8_0", "q4_k", "int8", "int4")  # int*: ONNX
BUGGED_KINDS = ("q8_0", "q4_k", "int4")
GRID_SHAPE = dict(hidden_size=256, num_attention_heads=4, num_hidden_layers=3,
                  intermediate_size=80, moe_intermediate_size=80, num_experts_per_tok=2)


def _mapped(t: ir.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], what: str) -> ir.Tensor:
    return ir.Tensor(t.shape, t.dtype, _Fn(t, fn, what))


@dataclass(frozen=True, eq=False)
class _Fn(ir.Recipe):
    """A bug's tensor: `fn` of the source tensor's value."""

    base: ir.Tensor
    fn: Callable[[torch.Tensor], torch.Tensor]
    what: str

    def evaluate(self) -> torch.Tensor:
        return self.fn(self.base.value().to(torch.float32))

    def describe(self) -> str:
        return f"{self.what}({self.base.recipe.describe()})"


def _blocks(model: ir.Model, edit: Callable[[int, ir.Block], ir.Block]) -> ir.Model:
    return replace(model, blocks=tuple(edit(i, b) for i, b in enumerate(model.blocks)))


def _middle(model: ir.Model, edit: Callable[[ir.Block], ir.Block]) -> ir.Model:
    mid = len(model.blocks) // 2
    return _blocks(model, lambda i, b: edit(b) if i == mid else b)


def _moe(block: ir.Block, **changes) -> ir.Block:
    return replace(block, ffn=replace(block.ffn, **changes))


def qk_unpermuted(model: ir.Model) -> ir.Model:
    """llama.cpp's q/k row order not applied (llama arch): the IR holds the inverse, so the
    writer's permutation leaves Hugging Face's order in the file."""
    def inverse(n_heads: int):
        forward = writer._permute_rows(n_heads)

        def fn(w: torch.Tensor) -> torch.Tensor:
            index = torch.arange(w.shape[0], dtype=torch.float64)[:, None]
            order = forward(index)[:, 0].round().long()
            out = torch.empty_like(w)
            out[order] = w
            return out
        return fn

    def edit(i: int, b: ir.Block) -> ir.Block:
        a = b.attn
        return replace(b, attn=replace(a, q=_mapped(a.q, inverse(a.n_heads), "unpermute"),
                                       k=_mapped(a.k, inverse(a.n_kv_heads), "unpermute")))
    return _blocks(model, edit)


def gate_up_swapped(model: ir.Model) -> ir.Model:
    return _blocks(model, lambda i, b: _moe(b, experts=tuple(
        ir.Expert(e.up, e.gate, e.down) for e in b.ffn.experts)))


def experts_swapped(model: ir.Model) -> ir.Model:
    """Experts 0 and 1 of the middle layer trade weights; the router is unchanged."""
    def edit(b: ir.Block) -> ir.Block:
        experts = list(b.ffn.experts)
        experts[0], experts[1] = experts[1], experts[0]
        return _moe(b, experts=tuple(experts))
    return _middle(model, edit)


def norm_scaled(model: ir.Model) -> ir.Model:
    return _middle(model, lambda b: replace(b, attn_norm=_mapped(b.attn_norm, lambda w: w * 1.1,
                                                                 "x1.1")))


def wrong_epsilon(model: ir.Model) -> ir.Model:
    return replace(model, norm_eps=1e-6 if model.norm_eps == 1e-5 else 1e-5)


def renormalising(model: ir.Model) -> ir.Model:
    """Top-k weights renormalised where the model does not."""
    return _blocks(model, lambda i, b: _moe(b, norm_topk=not b.ffn.norm_topk))


def router_row_negated(model: ir.Model) -> ir.Model:
    def negate_first(w: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        w[0] = -w[0]
        return w
    return _middle(model, lambda b: _moe(b, router=ir.Router(
        _mapped(b.ffn.router.weight, negate_first, "negate_row0"))))


def rope_base_wrong(model: ir.Model) -> ir.Model:
    return replace(model, rope=replace(model.rope, theta=1e4 if model.rope.theta > 1e5 else 1e6))


def shared_gate_negated(model: ir.Model) -> ir.Model:
    return _blocks(model, lambda i, b: _moe(b, shared=replace(
        b.ffn.shared, gate=_mapped(b.ffn.shared.gate, torch.neg, "neg"))))


BUGS: dict[str, Callable[[ir.Model], ir.Model]] = {
    "qk_perm": qk_unpermuted, "gate_up": gate_up_swapped, "experts_swap": experts_swapped,
    "norm_scale": norm_scaled, "eps": wrong_epsilon, "renorm": renormalising,
    "router_row": router_row_negated, "rope_theta": rope_base_wrong,
    "shared_gate": shared_gate_negated}


def applies(bug: str, family: str, kind: str) -> bool:
    """Where a format can hold the bug: the q/k order is llama.cpp's (Mixtral), a shared gate
    exists in Qwen2-MoE; llama.cpp's graphs fix top-k renormalisation per arch, so a GGUF can
    only renormalise wrongly as a Qwen3-MoE whose checkpoint does not (`reference_model`)."""
    onnx = kind.startswith("int")
    if bug == "qk_perm":
        return family == "mixtral" and not onnx
    if bug == "shared_gate":
        return family == "qwen2_moe"
    if bug == "renorm":
        return family == "qwen3_moe" if not onnx else family in ("qwen2_moe", "olmoe")
    return True


@dataclass
class Cell:
    family: str
    scale: float
    kind: str
    bug: str | None  # None: the correct export
    passed: bool  # compile-time verification's verdict (for a bug: the logit rule's)
    verify_passed: bool | None  # `moecompile verify`'s verdict on a bugged GGUF
    reason: str

    @property
    def wrong(self) -> bool:
        """A false alarm (a correct file failed) or a miss (a bugged file passed a check)."""
        if self.bug is None:
            return not self.passed
        return self.passed or bool(self.verify_passed)


def build(family: str, scale: float, out: Path, tokenizer_dir: Path) -> ir.Model:
    """The grid's checkpoint of `family` at weight scale `scale` (written once)."""
    if not (out / "config.json").exists():
        vocab = _vocab_size(tokenizer_dir)
        shape = dict(GRID_SHAPE)
        if family == "qwen3_moe":
            shape.update(head_dim=64, num_key_value_heads=2)
        elif family == "mixtral":
            shape.update(num_key_value_heads=2)
        elif family == "qwen2_moe":
            shape.update(num_key_value_heads=4, shared_expert_intermediate_size=96)
        else:
            shape.update(num_key_value_heads=4)
        config = tiny_config(family, vocab, initializer_range=scale, **shape)
        build_random_checkpoint(config, out, dtype=torch.bfloat16, tokenizer_dir=tokenizer_dir)
    return frontend.load(out)


def run_cells(model: ir.Model, family: str, scale: float, kind: str, work: Path,
              bugs: list[str] | None = None) -> list[Cell]:
    """The correct export of `model` as `kind`, then each applicable bug."""
    onnx = kind.startswith("int")
    target, suffix = ("onnx", ".onnx") if onnx else ("gguf", ".gguf")
    request = TypeRequest(quant=kind) if kind not in ("f32", "f16") else TypeRequest(dtype=kind)
    work.mkdir(parents=True, exist_ok=True)
    correct = compile_model(model, work / f"correct{suffix}", target, request, progress=False)
    cells = [Cell(family, scale, kind, None, correct.passed, None,
                  correct.verification.reason if correct.verification else "not verified")]
    if kind not in BUGGED_KINDS:
        return cells
    names = [b for b in (bugs or BUGS) if applies(b, family, kind)]
    tokens = verification_tokens(model)
    cached: dict[bool, References] = {}  # by "the reference does not renormalise"
    for name in names:
        renorm_gguf = name == "renorm" and not onnx
        if renorm_gguf:  # the checkpoint that does not renormalise, and the file that does
            reference = _blocks(model, lambda i, b: _moe(b, norm_topk=False))
            wrong = correct
        else:
            reference = model
            wrong = compile_model(BUGS[name](model), work / f"{name}{suffix}", target, request,
                                  verify=False, progress=False)
        if onnx:
            result = ONNXTarget().verify(reference.with_types(wrong.plan.model.types),
                                         wrong.output, "cpu")
            cells.append(Cell(family, scale, kind, name, result.passed, None, result.reason))
            continue
        if renorm_gguf not in cached:  # what the correct file computes, once per reference
            numerics = FileNumerics(correct.output, writer.plan(
                reference, correct.report["arch"], f32=True))
            cached[renorm_gguf] = references(reference, tokens, numerics, "cpu")
        got = run_llama_cpp(wrong.output, tokens.tolist())
        result = judge("llama.cpp", got, cached[renorm_gguf])
        try:
            verify_passed = GGUFTarget().verify_file(wrong.output, reference, "cpu").passed
        except (UserError, VerificationError):  # llama.cpp cannot run it at all: a failure
            verify_passed = False
        cells.append(Cell(family, scale, kind, name, result.passed, verify_passed,
                          result.reason))
    return cells
