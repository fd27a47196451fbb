"""Which tokens the layer-local sensitivity measures on, and which its chosen mixes are judged
on: spread over every task of the calibration, and over held-out items besides."""

import pytest
import torch

from moecompile import frontend
from moecompile.analysis import sensitivity
from moecompile.analysis.calibration import build_calib, held_out, spread_rows
from moecompile.exporters.gguf.target import GGUFTarget, group_units
from moecompile.tasks import load_calibration


@pytest.fixture(scope="module")
def model(tiny_model):
    return frontend.load(tiny_model("mixtral", hidden_size=256, intermediate_size=64))


def test_measured_rows_are_spread_over_every_task(model):
    """Calibration items come task by task: the first sequences holding the measurement
    tokens were the first tasks only."""
    calib = build_calib(model, "all", 12)
    tasks = [ex.task for ex in load_calibration("all", 12)]
    tokens = calib.n_tokens // 3
    rows = spread_rows(calib, tokens)
    assert int(calib.mask[rows].sum()) >= tokens
    assert {tasks[r] for r in rows} == set(tasks)
    first, total = 0, 0
    while total < tokens:  # what the first rows would have covered
        total += int(calib.mask[first].sum())
        first += 1
    assert {tasks[r] for r in range(first)} != set(tasks)
    assert spread_rows(calib, calib.n_tokens + 1) == list(range(len(tasks)))


def test_mixes_are_judged_on_held_out_tokens_too(model):
    """Given the held-out items, a mix's end-to-end KL is the mean over the measurement tokens
    and as many held-out ones: each set's KL against its own reference, weighted by tokens."""
    from moecompile.runtime.streaming import StreamingExecutor

    units = group_units(GGUFTarget().groups(model))
    rounding = GGUFTarget()._rounding(model, None)
    calib = build_calib(model, "add,sort", 4)
    held = held_out(model, calib)
    assert held is not None and held.n_examples == calib.n_examples
    _, info, check = sensitivity.local_losses(model, calib, units, ["q8_0", "q4_k"], rounding,
                                              "q4_k", progress=False, held=held)
    parts = []
    for data in (calib, held):
        rows = spread_rows(data, sensitivity.LOCAL_TOKENS)
        ids, mask = data.ids[rows], data.mask[rows]
        reference = sensitivity.StreamingKL()
        StreamingExecutor(model).run(ids, mask, reference.consume)
        parts.append((ids, mask, reference, int(mask.sum())))
    assert info["held_out_tokens"] == parts[1][3] > 0
    paths = {p for ps in units.values() for p in ps}
    with rounding("q4_k") as value:
        got = check(paths, value)
        each = [sensitivity.streaming_kl(model, ids, mask, ref,
                                         sensitivity.Replaced(paths, value))
                for ids, mask, ref, _ in parts]
    want = sum(kl * n for kl, (_, _, _, n) in zip(each, parts)) / sum(p[3] for p in parts)
    assert got == pytest.approx(want, rel=1e-4) and got > 0
    assert torch.isfinite(torch.tensor(each)).all() and each[0] != pytest.approx(each[1])
