"""What a width request (`--expert-width`, `--shared-width`) means, checked before any model is
read.

A width is a fraction of an MLP's intermediate neurons (`0.75`) or a neuron count (`192`); a
comma list gives one per MoE layer (`192,128,192`; for `--shared-width`, one per layer with a
shared expert or dense MLP). A fraction is rounded to a width that keeps quantization blocks
whole where that stays close to what was asked: a down projection's rows are its width, and
llama.cpp's k-quants need rows in multiples of 256 and its other block types (and ONNX's
int4/int8 blocks) multiples of 32, or the type falls back to a larger one. So a fraction takes
the nearest multiple of 256, else of 32, within 1/16 of the MLP's width of what it asks; a
neuron count is taken as given (asked otherwise), and the target reports a fallback it forces.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

BLOCKS = (256, 32)  # k-quant super-blocks, then the 32-wide blocks of every other type
TOLERANCE = 1 / 16  # how far (as a share of the full width) rounding to a block may move


@dataclass(frozen=True)
class WidthRequest:
    text: str
    values: tuple[float | int, ...]  # one for every layer, or one per layer (floats: fractions)
    flag: str = "--expert-width"

    @property
    def per_layer(self) -> bool:
        return len(self.values) > 1

    @property
    def uniform(self) -> bool:
        """One width everywhere: a single value, or a list of one value repeated."""
        return len(set(self.values)) == 1

    def value_for(self, position: int, count: int) -> float | int:
        """The value for the `position`-th of `count` layers it applies to."""
        if not self.per_layer:
            return self.values[0]
        if len(self.values) != count:
            raise UserError(f"{self.flag} {self.text}: {len(self.values)} widths for {count} "
                            "layers; give one, or one per layer")
        return self.values[position]

    def width_for(self, full: int, position: int = 0, count: int = 1) -> int:
        """Neurons to keep of an MLP of `full` neurons (never more than it has)."""
        value = self.value_for(position, count)
        if isinstance(value, int):
            if value > full:
                raise UserError(f"{self.flag} {self.text}: {value} neurons exceed the "
                                f"{full} the MLPs have")
            return value
        return block_friendly(value, full)


def parse(text: str, flag: str = "--expert-width") -> WidthRequest:
    """'0.75', '192' or a comma list of them; UserError for anything else."""
    values: list[float | int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value: float | int = float(part) if "." in part or "e" in part.lower() else int(part)
        except ValueError:
            raise UserError(f"{flag} '{text}': expected a fraction (0.75), a neuron count (192) "
                            "or a comma list of them, one per layer") from None
        if isinstance(value, float) and not 0 < value <= 1:
            raise UserError(f"{flag} '{text}': a fraction must be in (0, 1]")
        if isinstance(value, int) and value < 1:
            raise UserError(f"{flag} '{text}': an MLP keeps at least one neuron")
        values.append(value)
    return WidthRequest(str(text), tuple(values), flag)


def block_friendly(fraction: float, full: int) -> int:
    """round(fraction * full), moved to the nearest multiple of 256 (else 32) when that is
    within TOLERANCE * full and strictly between 0 and full."""
    target = fraction * full
    if fraction >= 1:
        return full
    for block in BLOCKS:
        m = round(target / block) * block
        if 0 < m < full and abs(m - target) <= TOLERANCE * full:
            return m
    return max(1, min(full, round(target)))
