"""The interface every runtime target implements, and what they share: the type request, the
type plan, the committed result and the write-verify-rename discipline.

A job asks a target, in order:
1. `configure(options)`: refuse flags the runtime cannot honour, before any model is read, and
   keep what its export needs (e.g. ONNX's MoE lowering);
2. `check(model)`: refuse an IR the runtime cannot run faithfully, with the reason;
3. `choose_types(model, request, ctx, variants)`: weight types as IR data (`Model.types`),
   their bytes and the runtime's memory for them, within `--budget` where one is given (with
   `--allow-prune`, also among fewer and narrower experts the job builds on request);
4. `commit(plan, out)`: write under a temporary name, run the file in its runtime against the
   reference executor on the file's own numerics, then rename it to OUT (or OUT.FAILED.*),
   leaving nothing half-written on any error or Ctrl-C;
5. `launch_plan(...)`, where the runtime has one (llama.cpp's offload command line).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from moecompile import ir
from moecompile.errors import UserError
from moecompile.verify import VerifyResult


@dataclass(frozen=True)
class TypeRequest:
    """What the user asked of the weight types (the same flags mean the same on every
    target, each within what its runtime can do)."""

    dtype: str = "auto"  # --dtype: auto keeps the source lossless
    quant: str | None = None  # --quant TYPE | "auto"
    quant_map: Path | None = None  # --quant-map FILE.json
    budget: int | None = None  # --budget, bytes of runtime memory
    budget_text: str | None = None  # as the user wrote it, for messages
    ctx: int | None = None  # --ctx the memory is planned for
    sensitivity: str = "auto"  # full | local | auto (local when the model streams)

    @property
    def fits_budget(self) -> bool:
        """--budget alone: the most faithful types that fit it, chosen by the target."""
        return (self.budget is not None and self.quant is None and self.quant_map is None
                and self.dtype == "auto")


@dataclass
class Variant:
    """A structural alternative the job builds for a target's budget (--allow-prune): the
    model with fewer and/or narrower experts (built by the passes, so its history says how),
    and its measured cost."""

    model: ir.Model
    loss: float  # KL to the original at full precision (job.PassVariants: on what data)
    lines: list[str] = field(default_factory=list)  # what building it printed


class VariantSource:
    """What the job offers a target that may trade structure for bytes: `variant(experts,
    width)` builds (once) the model pruned to `experts` routed experts per MoE layer and
    slimmed to `width` neurons per expert, and measures it. Targets decide which structures
    are worth building — they know the bytes — and never run a pass themselves."""

    def __call__(self, experts: int, width: int) -> Variant:
        raise NotImplementedError

    def judge(self, model: ir.Model, numerics) -> float:
        """KL(original || `model` computed with `numerics`, e.g. its weights as a file's types
        hold them), on the data variants are measured on: a structure with its types, end
        to end."""
        raise NotImplementedError


@dataclass
class TypePlan:
    """A model with its weight types chosen, and what that choice costs."""

    model: ir.Model  # with `types` set
    label: str  # names the file: the uniform type asked for, or "mixed"
    weight_bytes: int
    report: dict = field(default_factory=dict)  # entries for OUT.report.json
    lines: list[str] = field(default_factory=list)  # what the job prints about the choice
    details: dict = field(default_factory=dict)  # what the target's commit needs (private)


@dataclass
class Committed:
    """A written file (and its side files), with its verification."""

    output: Path
    files: list[Path]
    report: dict  # the target's fields of OUT.report.json
    verification: VerifyResult | None

    @property
    def passed(self) -> bool:
        return self.verification is None or self.verification.passed


@dataclass
class FileVerdict:
    """`moecompile verify FILE --against MODEL`: does the file compute what the checkpoint
    computes, within what its types allow?"""

    file: Path
    findings: list[str]  # what differs, most telling first (metadata, tensors, graph)
    verification: VerifyResult | None  # the file run in its runtime against the reference

    @property
    def passed(self) -> bool:
        return not self.findings and self.verification is not None and self.verification.passed

    def lines(self) -> list[str]:
        out = [f"verify {self.file}: {'PASS' if self.passed else 'FAIL'}"]
        if self.verification is not None:
            out.append("  " + self.verification.summary())
        out += [f"  {f}" for f in self.findings[:12]]
        if len(self.findings) > 12:
            out.append(f"  … and {len(self.findings) - 12} more")
        return out


class Target:
    name = ""
    suffix = ""
    holds_router_map = False  # can it compute EEP's exact (continuous) router mapping?

    def configure(self, options) -> None:
        raise NotImplementedError

    def check(self, model: ir.Model) -> None:
        raise NotImplementedError

    def choose_types(self, model: ir.Model, request: TypeRequest, ctx,
                     variants: VariantSource | None = None) -> TypePlan:
        """Types for `request`; with `variants` (--allow-prune) the budget may also take a
        structure with fewer or narrower experts, and the plan's model is that variant."""
        raise NotImplementedError

    def commit(self, plan: TypePlan, out: Path, verify: bool = True, device: str | None = None,
               progress: bool = True) -> Committed:
        raise NotImplementedError

    def launch_plan(self, plan: TypePlan, file_name: str, options) -> tuple[list[str], dict]:
        """(lines to print, report entries) for running the file; none by default. Planned
        before the file is written, so an impossible plan leaves nothing behind."""
        return [], {}

    def committed_lines(self, committed: Committed, plan: TypePlan) -> list[str]:
        """What the job prints about side files the commit wrote; none by default."""
        return []

    def verify_file(self, path: Path, model: ir.Model, device: str | None = None) -> FileVerdict:
        """Any file of this target's format, also one moecompile did not write, checked
        against the checkpoint's IR, reading its tensors and types from the file."""
        raise NotImplementedError


class BudgetUnreachable(UserError):
    """Even the smallest types exceed --budget; `experts` per layer would fit (None: not even
    one), which the message suggests (`--allow-prune` lets the budget choose structure)."""

    def __init__(self, message: str, experts: int | None):
        super().__init__(message)
        self.experts = experts


def resolve_ctx(model: ir.Model, ctx: int | None) -> int:
    """--ctx, by default 4096 or the model's context if shorter; checked against the model."""
    ctx = min(4096, model.context_length) if ctx is None else ctx
    if not 1 <= ctx <= model.context_length:
        raise UserError(f"--ctx {ctx}: must be between 1 and the model's context of "
                        f"{model.context_length}")
    return ctx


def types_entry(target: str, method: str, label: str, model: ir.Model) -> dict:
    """The history entry of a type choice: how it was made and how many IR tensors took each
    type (each tensor's type is IR data, `Model.types`, and the report lists the file's)."""
    counts: dict[str, int] = {}
    for kind in model.types.values():
        counts[kind] = counts.get(kind, 0) + 1
    return {"pass": "weight_types", "target": target, "method": method, "label": label,
            "tensors_by_type": dict(sorted(counts.items()))}


def type_table(unit_types: dict[str, str], kind_of) -> list[str]:
    """A short table of a choice: per kind of unit (`kind_of(unit)`), how many took each type,
    e.g. '  ffn_down_exps: q6_k x10, q4_k x6'."""
    kinds: dict[str, dict[str, int]] = {}
    for unit, kind in unit_types.items():
        row = kinds.setdefault(kind_of(unit), {})
        row[kind] = row.get(kind, 0) + 1
    return [f"  {k}: " + ", ".join(f"{t} x{n}" for t, n in sorted(row.items(), key=lambda kv:
                                                                     (-kv[1], kv[0])))
            for k, row in kinds.items()]


def temp_path(out: Path) -> Path:
    """Where a file is written before it is complete: hidden, beside its final name."""
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = temp_path(path)
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def failed_name(out: Path) -> Path:
    """Where a file that failed verification is kept: OUT.FAILED.gguf / OUT.FAILED.onnx."""
    return out.with_suffix(".FAILED" + out.suffix)
