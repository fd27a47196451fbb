"""`--quant-map FILE.json`: a user's {"name regex": "type"} rules, the same on every target.

The first rule whose regex matches a name wins, as in llama-quantize's --tensor-type; every
name must be matched, so a map never leaves a weight's type to chance. Names are the target's
units (GGUF tensor names, ONNX IR paths) and types its own (target.parse_type).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from moecompile.errors import UserError


def read_rules(path: Path, parse_type) -> list[tuple[re.Pattern, str]]:
    """The map as (compiled regex, parse_type(type)) rules in file order; UserError naming the
    file and the problem otherwise."""
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


def match_rules(path: Path, rules, names: list[str]) -> dict[str, str]:
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
