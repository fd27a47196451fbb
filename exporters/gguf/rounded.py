"""Each weight quantized once per command: the bytes of (IR path, type) kept on disk.

`--budget` at real size rounds the same weights to the same types many times: the layer-local
sensitivity rounds sampled experts at every candidate type, one probe rounds every expert at
the probe type, and each mix measured end to end rounds the whole model again, mostly to the
types the other mixes gave it. Quantizing is the expensive part (Q4_K with an importance
matrix: ~9 M values/s a core, 6.9 B values in OLMoE-1B-7B), dequantizing is not (~1 G values/s),
so a weight's bytes are kept the first time and dequantized on every later use; the file
written at the end copies the chosen mix's bytes from here (every mix chosen was measured, so
all of them are kept).

The bytes go to one append-only file per type in the user's cache folder (beside the resume
states; never /tmp, which may be memory), are read back with one positioned read, and are
removed when the store is closed or collected. A copy sent to a worker process starts empty
in that process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from moecompile.runtime.resume import scratch_folder


class RoundedStore:
    """The kept bytes of one command's rounded weights, by (IR path, ggml type)."""

    def __init__(self):
        self._folder: Path | None = None
        self._files: dict[int, object] = {}
        self._index: dict[tuple[str, int], tuple[int, int]] = {}  # -> (offset, bytes)
        self.hits = self.misses = 0

    def values(self, path: str, qtype: int, shape: tuple[int, ...],
               encode: Callable[[], np.ndarray]) -> np.ndarray:
        """float32 values (`shape`) of the weight at `path` stored as ggml type `qtype`:
        `encode()` gives its bytes the first time, the kept bytes give them after."""
        from . import ggml

        hit = self._index.get((path, qtype))
        if hit is None:
            self.misses += 1
            data = np.ascontiguousarray(encode()).view(np.uint8).reshape(-1)
            f = self._file(qtype)
            offset = f.seek(0, os.SEEK_END)
            f.write(memoryview(data))
            self._index[(path, qtype)] = (offset, data.nbytes)
            return ggml.dequantize(data, qtype, shape)
        self.hits += 1
        return ggml.dequantize(self.stored(path, qtype), qtype, shape)

    def stored(self, path: str, qtype: int) -> np.ndarray | None:
        """The kept bytes of `path` at `qtype` (None: never rounded to it), what a file of
        that type holds: the writer copies them instead of quantizing again."""
        hit = self._index.get((path, qtype))
        if hit is None:
            return None
        offset, nbytes = hit
        f = self._files[qtype]
        f.flush()
        data = np.empty(nbytes, dtype=np.uint8)
        if os.preadv(f.fileno(), [memoryview(data)], offset) != nbytes:
            raise OSError(f"{f.name}: short read of kept quantized weights")
        return data

    def _file(self, qtype: int):
        if self._folder is None:
            self._folder, self._finalizer = scratch_folder(self, "rounded")
        if qtype not in self._files:
            self._files[qtype] = open(self._folder / f"type{qtype}.bin", "w+b")
        return self._files[qtype]

    def close(self) -> None:
        """Remove the kept bytes (also done when the store is collected, or at exit)."""
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._index.clear()
        if self._folder is not None:
            self._finalizer()
            self._folder = None

    def __getstate__(self):
        return {}  # a worker's copy keeps its own bytes

    def __setstate__(self, state):
        self.__init__()
