"""Width requests: fractions round to whole quantization blocks where that stays close, counts
are taken as given, and malformed requests are refused before any model is read."""

import pytest

from moecompile.errors import UserError
from moecompile.widths import block_friendly, parse


@pytest.mark.parametrize("fraction,full,want", [
    (0.75, 14336, 10752),  # Mixtral: 42 x 256
    (0.5, 14336, 7168),
    (0.7, 14336, 9984),  # 10035 asked: 39 x 256 is within 1/16 of the width
    (0.75, 1024, 768),  # OLMoE: 3 x 256
    (0.75, 768, 576),  # Qwen3-30B-A3B: no multiple of 256 near, 18 x 32
    (0.75, 256, 192),  # the bundled model
    (0.5, 256, 128),
    (0.75, 48, 36),  # the tiny test models: no block is close, round(36)
    (1.0, 256, 256),
    (0.001, 256, 1),
])
def test_fractions_keep_whole_blocks_where_close(fraction, full, want):
    assert block_friendly(fraction, full) == want


def test_counts_lists_and_their_limits():
    assert parse("192").width_for(256) == 192  # a count is taken as given
    assert parse("0.75").width_for(256) == 192
    per_layer = parse("192, 0.5,100")
    assert per_layer.per_layer and not per_layer.uniform
    assert [per_layer.width_for(256, i, 3) for i in range(3)] == [192, 128, 100]
    assert parse("128,128").uniform
    with pytest.raises(UserError, match="3 widths for 2 layers"):
        per_layer.width_for(256, 0, 2)
    with pytest.raises(UserError, match="300 neurons exceed the 256"):
        parse("300").width_for(256)


@pytest.mark.parametrize("text,message", [("0", "at least one neuron"), ("1.5", r"in \(0, 1\]"),
                                          ("-0.5", r"in \(0, 1\]"), ("abc", "expected a fraction"),
                                          ("0.5,", "expected a fraction")])
def test_malformed_widths_are_refused(text, message):
    with pytest.raises(UserError, match=message):
        parse(text)
