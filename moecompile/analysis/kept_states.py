"""Hidden states kept on disk between a search's generations (population.py).

A child that differs from its parent only in deep layers can start from its parent's state
at the first layer they differ in, but the parents a generation draws from are spread over
the archive's best, and a state is calibration tokens x hidden size of float32 (34 MB for
4096 tokens of OLMoE; each candidate has one per MoE layer). Held in memory, a few hundred MB
kept about two candidates' states, fewer than a generation's parents, at a cost in peak
memory. On disk they cost the page cache, which the kernel gives back, not resident memory:
a budget of `DISK_BYTES` keeps every state of the last dozen or so candidates at 4 layers,
of the last several at 16. Files are written once and read back whole; they live in the
user's cache folder and are removed when the search ends (on error and at exit too).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from moecompile.runtime.resume import scratch_folder

DISK_BYTES = 4 << 30


class KeptStates:
    """An LRU of float32 tensors by key, in files, within `budget` bytes."""

    def __init__(self, budget: int = DISK_BYTES):
        self.budget = budget
        self._index: OrderedDict[tuple, tuple[Path, tuple[int, ...]]] = OrderedDict()
        self._bytes = 0
        self._names = 0
        self._folder: Path | None = None
        self._finalizer = None

    def __contains__(self, key: tuple) -> bool:
        return key in self._index

    def get(self, key: tuple, device) -> torch.Tensor | None:
        hit = self._index.get(key)
        if hit is None:
            return None
        self._index.move_to_end(key)
        path, shape = hit
        return torch.from_numpy(np.fromfile(path, dtype=np.float32).reshape(shape)).to(device)

    def put(self, key: tuple, h: torch.Tensor) -> None:
        if key in self._index:
            self._index.move_to_end(key)
            return
        size = h.numel() * 4
        if size > self.budget:
            return
        while self._index and self._bytes + size > self.budget:
            _, (old, shape) = self._index.popitem(last=False)
            old.unlink()
            self._bytes -= 4 * int(np.prod(shape))
        path = self._folder_now() / f"{self._names}.f32"
        self._names += 1
        h.detach().to("cpu", torch.float32).contiguous().numpy().tofile(path)
        self._index[key] = (path, tuple(h.shape))
        self._bytes += size

    def _folder_now(self) -> Path:
        if self._folder is None:
            self._folder, self._finalizer = scratch_folder(self, "states")
        return self._folder

    def close(self) -> None:
        """Remove the files (also done when this is collected, or at exit)."""
        self._index.clear()
        self._bytes = 0
        if self._folder is not None:
            self._finalizer()
            self._folder = None
