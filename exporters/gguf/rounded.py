"""Each weight quantized once per command: the bytes of (IR path, type) kept on disk.

`--budget` at real size rounds the same weights to the same types many times: the layer-local
sensitivity rounds sampled experts at every candidate type, its probes round them again at the
probe type, and each mix measured end to end rounds the whole model again, mostly to the
types the other mixes gave it. Quantizing is the expensive part (Q4_K with an importance
matrix: ~9 M values/s a core, 6.9 B values in OLMoE-1B-7B), dequantizing is not (~1 G values/s),
so a weight's bytes are kept the first time and dequantized on every later use; the file
written at the end copies the chosen mix's bytes from here (every mix chosen was measured, so
all of them are kept).

The bytes go to one append-only file per type in the user's cache folder (beside the resume
states; never /tmp, which may be memory), are read back with one positioned read, and are
removed when the store is closed or collected. A copy sent to a worker process starts empty
in that process.

What is kept grows with the model: 8.7 GB for OLMoE-1B-7B's `--budget 5GB` (measured), about
seven times that for Mixtral-8x7B. So the store keeps bytes only while the cache's disk keeps
`KEEP_FREE` free (the file the command writes needs room too); past that, a weight is
quantized again each time it is used, which costs time, never the result: the values are the
same either way.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from moecompile.runtime.resume import scratch_folder

KEEP_FREE = 8 << 30  # bytes the store leaves free on its disk


class RoundedStore:
    """The kept bytes of one command's rounded weights, by (IR path, ggml type)."""

    def __init__(self, keep_free: int | None = None):
        self._folder: Path | None = None
        self._files: dict[int, object] = {}
        self._index: dict[tuple[str, int], tuple[int, int]] = {}  # -> (offset, bytes)
        self.hits = self.misses = 0
        self.keep_free = KEEP_FREE if keep_free is None else keep_free
        self.not_kept = 0  # weights rounded but not kept: the disk had no room left for them
        self.kept_bytes = 0

    def values(self, path: str, qtype: int, shape: tuple[int, ...],
               encode: Callable[[], np.ndarray]) -> np.ndarray:
        """float32 values (`shape`) of the weight at `path` stored as ggml type `qtype`:
        `encode()` gives its bytes the first time, the kept bytes give them after."""
        from . import ggml

        hit = self._index.get((path, qtype))
        if hit is None:
            self.misses += 1
            data = np.ascontiguousarray(encode()).view(np.uint8).reshape(-1)
            self._keep(path, qtype, data)
            return ggml.dequantize(data, qtype, shape)
        self.hits += 1
        return ggml.dequantize(self.stored(path, qtype), qtype, shape)

    def holds(self, path: str, qtype: int) -> bool:
        """Whether the bytes of `path` at `qtype` are kept (using them rounds nothing)."""
        return (path, qtype) in self._index

    def stored(self, path: str, qtype: int) -> np.ndarray | None:
        """The kept bytes of `path` at `qtype` (None: never rounded to it, or not kept), what a
        file of that type holds: the writer copies them instead of quantizing again."""
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

    def _keep(self, path: str, qtype: int, data: np.ndarray) -> None:
        """Append `data` to its type's file while the disk keeps `keep_free` bytes free (a
        full disk found by the write itself counts the same: the partial write is cut off)."""
        f = self._file(qtype)
        if self.not_kept or shutil.disk_usage(self._folder).free - data.nbytes < self.keep_free:
            self.not_kept += 1
            return
        offset = f.seek(0, os.SEEK_END)
        try:
            f.write(memoryview(data))
            f.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            f.truncate(offset)
            self.not_kept += 1
            return
        self._index[(path, qtype)] = (offset, data.nbytes)
        self.kept_bytes += data.nbytes

    def _file(self, qtype: int):
        if self._folder is None:
            self._folder, self._finalizer = scratch_folder(self, "rounded")
        if qtype not in self._files:
            self._files[qtype] = open(self._folder / f"type{qtype}.bin", "w+b")
        return self._files[qtype]

    def shortfall(self) -> str | None:
        """A line for the user when the disk ran short (None when every weight was kept)."""
        if not self.not_kept:
            return None
        return (f"rounded weights: {self.not_kept} not kept beside the "
                f"{self.kept_bytes / 2**30:.1f} GiB kept in {self._folder.parent}: its disk "
                f"had under {self.keep_free / 2**30:.0f} GiB free, or was full; they are "
                f"quantized again where used (slower, the same values)")

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
