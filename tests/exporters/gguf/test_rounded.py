"""The store of rounded weights: each (path, type) quantized once, the same values every time."""

import json
import pickle

import numpy as np
import pytest
import torch

from moecompile.exporters.gguf.rounded import RoundedStore
from moecompile.exporters.gguf.types import Q, encode, roundtrip


def test_kept_bytes_give_the_rounded_values_and_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMPILE_RESUME_DIR", str(tmp_path / "resume"))
    rng = np.random.default_rng(0)
    weights = {p: rng.standard_normal((64, 256)).astype(np.float32) for p in ("a", "b")}
    imatrix = rng.random(256).astype(np.float32) + 0.1
    calls = []

    def encoder(path, qtype):
        def run():
            calls.append((path, qtype))
            return encode(torch.from_numpy(weights[path]), qtype, imatrix)
        return run

    store = RoundedStore()
    for _ in range(2):
        for path in weights:
            for qtype in (Q.Q4_K, Q.Q8_0, Q.Q2_K):
                got = store.values(path, int(qtype), (64, 256), encoder(path, qtype))
                assert np.array_equal(got, roundtrip(weights[path], qtype, imatrix))
    assert len(calls) == 6 and (store.hits, store.misses) == (6, 6)  # each quantized once
    folder = store._folder
    assert folder.parent == tmp_path / "rounded" and any(folder.iterdir())
    copy = pickle.loads(pickle.dumps(store))  # what a worker process gets: its own, empty
    assert copy._folder is None and not copy._index
    store.close()
    assert not folder.exists()


def test_a_disk_without_room_keeps_nothing_and_changes_no_value(tmp_path, monkeypatch):
    """Past the free space the store leaves on its disk (here more than any disk has), every
    use quantizes again — the same values — and the user is told why it is slower."""
    monkeypatch.setenv("MOECOMPILE_RESUME_DIR", str(tmp_path / "resume"))
    weights = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    calls = []

    def run():
        calls.append(1)
        return encode(torch.from_numpy(weights), Q.Q4_K, None)

    store = RoundedStore(keep_free=1 << 62)
    for _ in range(3):
        got = store.values("a", int(Q.Q4_K), (64, 256), run)
        assert np.array_equal(got, roundtrip(weights, Q.Q4_K, None))
    assert len(calls) == 3 and store.not_kept == 3 and store.stored("a", int(Q.Q4_K)) is None
    assert "3 not kept" in store.shortfall() and "quantized again" in store.shortfall()
    assert RoundedStore().shortfall() is None
    store.close()


def test_the_file_copies_kept_bytes_in_its_own_row_order(tiny_model, tmp_path, monkeypatch):
    """The writer copies a store's bytes instead of quantizing: kept with an importance vector
    and written without one, the file equals the file written with it — also for llama's q/k,
    whose rows the file permutes (Mixtral)."""
    from moecompile import frontend
    from moecompile.exporters.gguf import writer
    from moecompile.exporters.gguf.target import GGUFTarget

    monkeypatch.setenv("MOECOMPILE_RESUME_DIR", str(tmp_path / "resume"))
    model = frontend.load(tiny_model("mixtral"))
    target = GGUFTarget()
    typed = target.typed(model, {t.name: "q4_k" for t in target.quantizable(model)})
    planned = writer.plan(typed, "llama")
    assert any(t.transform is not None for t in planned)
    rng = np.random.default_rng(1)
    importance = {t.name: rng.random(t.shape[-1] * len(t.parts)).astype(np.float32) + 0.05
                  for t in planned if t.qtype != Q.F32}
    store = RoundedStore()
    for t in planned:
        if t.qtype == Q.F32:
            continue
        n = t.shape[-1]
        for i, (path, part) in enumerate(zip(t.paths, t.parts)):
            store.values(path, int(t.qtype), part.shape, lambda: encode(
                part.value().reshape(-1, n), t.qtype, importance[t.name][i * n:(i + 1) * n]))
    with_vector = writer.export(typed, tmp_path / "a.gguf", "llama", importance, progress=False)
    copied = writer.export(typed, tmp_path / "b.gguf", "llama", None, progress=False,
                           rounded=store)
    plain = writer.export(typed, tmp_path / "c.gguf", "llama", None, progress=False)
    a, b, c = (r.path.read_bytes() for r in (with_vector, copied, plain))
    assert a == b and b != c
    store.close()


@pytest.mark.parametrize("allow_prune", [False, True])
def test_quant_auto_says_when_the_disk_kept_no_rounded_weight(smallest_budget, tmp_path,
                                                             monkeypatch, capsys, allow_prune):
    """--quant auto at real size (streaming forced), with and without --allow-prune, on a disk
    without the room the store leaves free: the file is still written and verifies, and the
    output and the report say how many rounded weights were quantized again."""
    from moecompile.cli import main
    from moecompile.exporters.gguf import rounded
    from moecompile.runtime import streaming

    monkeypatch.setenv("MOECOMPILE_RESUME_DIR", str(tmp_path / "resume"))
    folder, _, budget = smallest_budget(0.7 if allow_prune else 1.5)
    monkeypatch.setattr(streaming, "STREAM_ABOVE", 0)
    monkeypatch.setattr(rounded, "KEEP_FREE", 1 << 62)
    out = tmp_path / "m.gguf"
    assert main([str(folder), "-o", str(out), "--quant", "auto", "--budget", str(budget),
                 "--ctx", "128", "--calib", "add,rev", "--calib-n", "3",
                 *(["--allow-prune", "--prune-method", "frequency"] if allow_prune else [])]) == 0
    said = capsys.readouterr()
    assert "not kept beside" in said.out + said.err
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["quant"]["rounded_not_kept"] > 0 and report["verification"]["passed"]


def test_allow_prune_writes_the_winners_rounded_weights_as_measured(smallest_budget,
                                                                    tmp_path, monkeypatch):
    """--allow-prune at real size (streaming forced, every measured structure settled end to
    end): the file copies the rounded weights the winning structure was measured with, and
    is byte for byte the file written when the store keeps nothing (quantized again)."""
    from moecompile.analysis import allocate
    from moecompile.cli import main
    from moecompile.exporters.gguf import rounded, writer
    from moecompile.runtime import streaming

    monkeypatch.setenv("MOECOMPILE_RESUME_DIR", str(tmp_path / "resume"))
    folder, _, budget = smallest_budget(0.7)
    monkeypatch.setattr(streaming, "STREAM_ABOVE", 0)
    monkeypatch.setattr(allocate, "CONTEND_RATIO", float("inf"))
    kept = []
    export = writer.export

    def spied(*args, rounded=None, **kw):
        kept.append(0 if rounded is None else rounded.kept_bytes)
        return export(*args, rounded=rounded, **kw)

    monkeypatch.setattr(writer, "export", spied)
    files = []
    for keep_free in (None, 1 << 62):
        if keep_free is not None:
            monkeypatch.setattr(rounded, "KEEP_FREE", keep_free)
        out = tmp_path / f"m{len(files)}.gguf"
        assert main([str(folder), "-o", str(out), "--quant", "auto", "--budget", str(budget),
                     "--ctx", "128", "--calib", "add,rev", "--calib-n", "3", "--quiet",
                     "--no-verify", "--allow-prune", "--prune-method", "frequency"]) == 0
        report = json.loads(out.with_suffix(".report.json").read_text())
        assert report["quant"]["structure"]["width"] < 256 or \
            report["quant"]["structure"]["experts"] < 8
        files.append(out.read_bytes())
    assert kept[0] > 0 and kept[1] == 0
    assert files[0] == files[1]


def test_the_mixes_time_counts_only_what_is_not_kept_yet():
    """eta.mixes_known: a pass per mix, plus each (weight, type) no earlier stage kept and no
    earlier mix rounded, at its type's rate; a 16-bit type (a cast) rounds nothing."""
    from moecompile.exporters.gguf import eta

    units = {"a": ["w0", "w1"], "b": ["w2"]}
    numel = {"w0": 10, "w1": 20, "w2": 40}
    rates = {"q4_k": 1.0, "q3_k": 2.0}
    nothing_kept = lambda path, name: False  # noqa: E731
    one_pass = 8 / 4096 * eta.LOCAL_TOKENS

    def time_of(mixes, kept=nothing_kept):
        return eta.mixes_known(mixes, units, numel, rates, kept, 8.0, 4096)

    assert time_of([{"a": "q4_k", "b": "bf16"}]) == (one_pass + 30.0, 30)
    # the second mix rounds only b at q3_k: a at q4_k was rounded by the first
    assert time_of([{"a": "q4_k", "b": "q4_k"}, {"a": "q4_k", "b": "q3_k"}]) == (
        2 * one_pass + 70.0 + 80.0, 110)
    assert time_of([{"a": "q4_k", "b": "q4_k"}], lambda path, name: path != "w2") == (
        one_pass + 40.0, 40)
