"""The verifier's grid (issue 14): 4 families x 5 weight scales x F32/F16/Q8_0/Q4_K/ONNX
int8/int4, every correct export passes; every injected bug fails on Q8_0, Q4_K and ONNX int4,
through the logit rule and (GGUF) `moecompile verify`. See moecompile/testing/verify_grid.py."""

from __future__ import annotations

import pytest
import torch

from moecompile.testing import verify_grid as grid


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: torch's thread pool costs more than it gains (6x on shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("scale", grid.SCALES)
@pytest.mark.parametrize("family", grid.FAMILIES)
def test_grid(family, scale, tokenizer_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"grid-{family}-{scale}")
    model = grid.build(family, scale, work / "model", tokenizer_dir)
    cells = [c for kind in grid.KINDS
             for c in grid.run_cells(model, family, scale, kind, work / kind)]
    assert len(cells) > len(grid.KINDS)
    wrong = [f"{c.kind} {c.bug or 'correct'}: passed={c.passed} verify={c.verify_passed} "
             f"{c.reason}" for c in cells if c.wrong]
    assert not wrong, "\n".join(wrong)
