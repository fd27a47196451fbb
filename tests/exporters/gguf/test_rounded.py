"""The store of rounded weights: each (path, type) quantized once, the same values every time."""

import pickle

import numpy as np
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
