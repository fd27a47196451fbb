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


def from_map(model: ir.Model, path: Path) -> dict[str, Q]:
    """A user's map: {"regex": "type", ...} over GGUF tensor names; the first match wins, as in
    llama-quantize's --tensor-type. Every quantizable tensor must be matched."""
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
            rules.append((re.compile(pattern), gq.parse_type(str(type_name))))
        except re.error as exc:
            raise UserError(f"--quant-map {path}: bad pattern {pattern!r} ({exc})") from None
    out, unmatched = {}, []
    for s in slots(model):
        if not s.quantizable:
            continue
        hit = next((q for rx, q in rules if rx.search(s.name)), None)
        if hit is None:
            unmatched.append(s.name)
        else:
            out[s.name] = hit
    if unmatched:
        raise UserError(f"--quant-map {path}: no rule for {', '.join(unmatched[:3])}"
                        + (f" and {len(unmatched) - 3} more" if len(unmatched) > 3 else ""))
    return out


def weight_bytes(model: ir.Model, types: dict[str, Q]) -> int:
    """The tensor data bytes of the GGUF these types produce (F32 where no type is given)."""
    return sum(s.bytes_at(types.get(s.name, Q.F32)) for s in slots(model))
