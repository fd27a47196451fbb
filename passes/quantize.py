"""Which llama.cpp weight type each GGUF tensor gets: uniform, the user's map, or chosen.

The unit of choice is a GGUF tensor (llama.cpp stores a layer's experts as one stacked tensor,
so per-expert precision is not possible there). Routers, norms and biases are never quantized
(llama.cpp's own rule; written F32). Sizes follow llama.cpp's rules exactly, fallback included
(exporters/gguf_quant.py), so a plan's weight bytes are the file's tensor bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from moecompile import ir
from moecompile.errors import UserError
from moecompile.exporters import gguf as gguf_export
from moecompile.exporters import gguf_quant as gq

Q = gq.Q


@dataclass(frozen=True)
class Slot:
    """One GGUF tensor a type is chosen for."""

    name: str
    shape: tuple[int, ...]
    parts: tuple  # the IR tensors it holds

    @property
    def quantizable(self) -> bool:
        return not gq.never_quantized(self.name, self.shape)

    def bytes_at(self, qtype: Q) -> int:
        return gq.tensor_bytes(gq.effective_type(qtype, self.shape), self.shape)


def slots(model: ir.Model) -> list[Slot]:
    arch = gguf_export.check_exportable(model)
    return [Slot(t.name, tuple(t.shape), t.parts) for t in gguf_export.plan(model, "f32", arch)]


def uniform(model: ir.Model, type_name: str) -> dict[str, Q]:
    qtype = gq.parse_type(type_name)
    return {s.name: qtype for s in slots(model) if s.quantizable}


def read_rules(path: Path, parse_type) -> list[tuple[re.Pattern, object]]:
    """A user's type map {"regex": "type", ...} as (compiled regex, parse_type(type)) rules in
    file order; UserError naming the file and the problem otherwise."""
    try:
        mapping = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--quant-map {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"--quant-map {path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"--quant-map {path}: expected an object {{\"tensor regex\": \"type\"}}")
    rules = []
    for pattern, type_name in mapping.items():
        try:
            rules.append((re.compile(pattern), parse_type(str(type_name))))
        except re.error as exc:
            raise UserError(f"--quant-map {path}: bad pattern {pattern!r} ({exc})") from None
    return rules


def match_rules(path: Path, rules, names: list[str]) -> dict[str, object]:
    """name -> the type of the first rule matching it; every name must be matched."""
    out, unmatched = {}, []
    for name in names:
        hit = next((q for rx, q in rules if rx.search(name)), None)
        if hit is None:
            unmatched.append(name)
        else:
            out[name] = hit
    if unmatched:
        raise UserError(f"--quant-map {path}: no rule for {', '.join(unmatched[:3])}"
                        + (f" and {len(unmatched) - 3} more" if len(unmatched) > 3 else ""))
    return out


def from_map(model: ir.Model, path: Path) -> dict[str, Q]:
    """A user's map: {"regex": "type", ...} over GGUF tensor names; the first match wins, as in
    llama-quantize's --tensor-type. Every quantizable tensor must be matched."""
    rules = read_rules(path, gq.parse_type)
    return match_rules(path, rules, [s.name for s in slots(model) if s.quantizable])


def weight_bytes(model: ir.Model, types: dict[str, Q]) -> int:
    """The tensor data bytes of the GGUF these types produce (F32 where no type is given)."""
    return sum(s.bytes_at(types.get(s.name, Q.F32)) for s in slots(model))


# ----------------------------------------------------------------- sensitivity and allocation

CANDIDATES = ("q8_0", "q6_k", "q5_k", "q4_k", "iq4_xs", "q3_k", "q2_k")


def group_of(name: str) -> str:
    """The unit a type is chosen for: a layer's attention, each stacked expert tensor, a layer's
    shared expert, the embedding, the output head."""
    m = re.match(r"blk\.(\d+)\.(\w+?)\.weight$", name)
    if not m:
        return name.removesuffix(".weight")
    layer, kind = m.groups()
    if kind.startswith("attn_"):
        return f"blk.{layer}.attn"
    if kind.endswith("_shexp"):
        return f"blk.{layer}.shexp"
    return f"blk.{layer}.{kind}"


def group_bytes(group: list[Slot], type_name: str) -> int:
    return sum(s.bytes_at(gq.TYPES[type_name]) for s in group)


def unquantized_bytes(model: ir.Model) -> int:
    """Routers, norms, biases: F32 whatever the types chosen."""
    return sum(s.bytes_at(Q.F32) for s in slots(model) if not s.quantizable)


def groups(model: ir.Model) -> dict[str, list[Slot]]:
    out: dict[str, list[Slot]] = {}
    for s in slots(model):
        if s.quantizable:
            out.setdefault(group_of(s.name), []).append(s)
    return out


def sensitivity(model: ir.Model, calib, candidates=CANDIDATES, imatrix=None, device="cpu",
                workdir: Path | None = None, progress: bool = True) -> dict[str, dict[str, float]]:
    """KL(original || model with only this group at this type), mean over calibration tokens.

    Each candidate type is applied by llama.cpp's quantizer to the whole model once and read
    back dequantized; then one group at a time takes those weights. The calibration tokens
    reach each expert as often as real use does, so an expert tensor's loss is already weighted
    by how much its experts are used."""
    import tempfile

    from tqdm import tqdm

    from moecompile.exporters.gguf_quant import FileNumerics

    by_group = groups(model)
    members = {g: {id(p) for s in ss for p in s.parts} for g, ss in by_group.items()}
    kl = CalibKL(model, calib, device)
    out: dict[str, dict[str, float]] = {g: {} for g in by_group}
    arch = gguf_export.check_exportable(model)
    planned = gguf_export.plan(model, "f32", arch)
    bar = tqdm(total=len(candidates) * len(by_group), desc="quant sensitivity", disable=not progress)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        source = Path(tmp) / "f32.gguf"
        gguf_export.export(model, source, dtype="f32", progress=False)
        for name in candidates:
            target = Path(tmp) / f"{name}.gguf"
            gq.quantize_file(source, target, uniform(model, name), imatrix)
            numerics = FileNumerics(target, planned)
            target.unlink()
            for g, ids in members.items():
                def weight(t, ids=ids):
                    hit = numerics.values.get(id(t)) if id(t) in ids else None
                    return t.value() if hit is None else torch.from_numpy(hit)
                out[g][name] = kl(weight)
                bar.update(1)
    bar.close()
    return out


class CalibKL:
    """KL(original || the model with some weights replaced), mean over the calibration tokens:
    the original's log-probabilities are computed once, each replacement costs one forward
    pass of the reference executor with its `weight_fn`."""

    def __init__(self, model: ir.Model, calib, device: str = "cpu"):
        self.model, self.calib, self.device = model, calib, device
        self.mask = calib.mask.bool()
        with torch.no_grad():
            self.ref = torch.log_softmax(self._logits(None), -1)

    def _logits(self, weight_fn):
        from moecompile.runtime.executor import ReferenceExecutor

        executor = ReferenceExecutor(self.model, self.device, weight_fn)
        return executor.logits(self.calib.ids, self.calib.mask)

    def __call__(self, weight_fn) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(self._logits(weight_fn), -1)
        kl = (self.ref.exp() * (self.ref - logp)).sum(-1)[self.mask].mean()
        return max(0.0, float(kl))


@dataclass
class Allocation:
    types: dict[str, Q]  # GGUF name -> type
    group_types: dict[str, str]
    weight_bytes: int
    predicted_kl: float


def allocate(model: ir.Model, sens: dict[str, dict[str, float]], weight_budget: int) -> Allocation:
    """llama.cpp types per GGUF tensor group under a byte budget (see `choose`). Raises
    BudgetError when even the smallest types do not fit, naming that size."""
    by_group = groups(model)
    group_types, total, predicted = choose(
        sens, lambda g, name: group_bytes(by_group[g], name), unquantized_bytes(model),
        weight_budget)
    types = {s.name: gq.TYPES[group_types[g]] for g, ss in by_group.items() for s in ss}
    return Allocation(types, group_types, total, predicted)


def choose(sens: dict[str, dict[str, float]], size, fixed: int,
           weight_budget: int) -> tuple[dict[str, str], int, float]:
    """Cheapest predicted loss under a byte budget: start every group at its best type, then
    repeatedly take the downgrade that saves bytes at the least added loss per byte (losses of
    groups add up, the usual first-order assumption). `size(group, type)` is bytes; `fixed`
    the bytes no choice changes. Returns (group -> type, total bytes, predicted loss)."""
    # per group: one option per distinct size (the lower-loss type where a fallback makes two
    # types the same size), biggest first; start from the lowest-loss option
    order: dict[str, list[str]] = {}
    for g in sens:
        best_at: dict[int, str] = {}
        for name in sens[g]:
            n = size(g, name)
            if n not in best_at or sens[g][name] < sens[g][best_at[n]]:
                best_at[n] = name
        order[g] = [best_at[n] for n in sorted(best_at, reverse=True)]
    choice = {g: min(range(len(order[g])), key=lambda i: (sens[g][order[g][i]], -i)) for g in sens}
    total = fixed + sum(size(g, order[g][choice[g]]) for g in sens)
    smallest = fixed + sum(size(g, order[g][-1]) for g in sens)
    if smallest > weight_budget:
        raise BudgetError(smallest)
    while total > weight_budget:
        best = None
        for g, i in choice.items():
            if i + 1 >= len(order[g]):
                continue
            a, b = order[g][i], order[g][i + 1]
            cost = (sens[g][b] - sens[g][a]) / (size(g, a) - size(g, b))
            if best is None or cost < best[0]:
                best = (cost, g)
        g = best[1]
        total -= size(g, order[g][choice[g]]) - size(g, order[g][choice[g] + 1])
        choice[g] += 1
    group_types = {g: order[g][i] for g, i in choice.items()}
    return group_types, total, sum(sens[g][group_types[g]] for g in sens)


class BudgetError(UserError):
    def __init__(self, smallest_weights: int):
        super().__init__(f"weights cannot be smaller than {smallest_weights} bytes")
        self.smallest_weights = smallest_weights
