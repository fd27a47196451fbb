"""Memory sizes as users type them and as messages print them.

    parse_size("24GB") -> 24_000_000_000;  parse_size("8GiB") -> 8 * 2**30
"""

from __future__ import annotations

import re

from .errors import UserError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str, what: str = "--budget") -> int:
    """'24GB', '8GiB', '512MB', '1.5G', or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise UserError(f"{what} '{text}': expected a size such as 24GB, 8GiB, 512MB or a number "
                        "of bytes")
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise UserError(f"{what} '{text}': must be more than zero")
    return int(value)


def format_size(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
