"""Fixtures of the pass tests."""

from __future__ import annotations

import pytest

from moecompile.analysis.calibration import build_calib


@pytest.fixture(scope="module")
def calib_of():
    """`calib_of(model, spec, n)`: a calibration set, built once per module and arguments."""
    cache = {}

    def get(model, spec="add,sort", n=6):
        key = (model.source, spec, n)
        if key not in cache:
            cache[key] = build_calib(model, spec, n)
        return cache[key]
    return get
