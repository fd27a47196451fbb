"""Resuming a long layer-major pass where it stopped.

After each block a pass's whole state — the hidden states of every calibration sequence, what
its observers have summed, the next block — goes to disk atomically (a temporary file renamed
over the last one), under a key that fingerprints everything the state depends on: the
checkpoint's files, the IR's history, the calibration tokens, the pass and its settings, and
moecompile's version. Ctrl-C and the same command again starts at the first unfinished block and
computes the same numbers, so the output is byte-identical to an uninterrupted run; nothing
before that block is redone. States live in the user's cache folder (XDG_CACHE_HOME, else
~/.cache, `moecompile/resume/KEY/`), never beside the output, and are removed when the pass
completes (GPTQModel's and ModelOpt's per-layer checkpoints; shared/research/scale.md §6.11).

A state is written by one background thread while the pass computes the next block (a copy is
taken first, so the pass may change its own): writing a 16-layer OLMoE pass's states in its own
thread took 2.4 s of its 44. Writes are done in order, and every read of a state waits for
the writes before it; Ctrl-C lets the write under way finish (the process waits for it at exit).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import __version__, ir

ENV = "MOECOMPILE_RESUME_DIR"
_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moecompile-resume")


def cache_root() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moecompile" / "resume"


def scratch_folder(owner, kind: str) -> tuple[Path, weakref.finalize]:
    """A fresh folder for `owner`'s temporary files, in the user's cache beside the resume
    states (never /tmp, which may be memory): `moecompile/KIND/PID-...`. Removed when `owner`
    is collected or at exit; call the finalizer returned to remove it sooner."""
    root = cache_root().parent / kind
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
    return folder, weakref.finalize(owner, shutil.rmtree, folder, True)


def code_files() -> list[Path]:
    """moecompile's own code: every .py of the package, its passes and its exporters."""
    roots = {Path(p) for name in ("moecompile", "moecompile.passes", "moecompile.exporters")
             for p in importlib.util.find_spec(name).submodule_search_locations}
    return sorted({f for root in roots for f in root.rglob("*.py")})


@functools.lru_cache(maxsize=1)
def code_digest() -> bytes:
    """A digest of `code_files`: a state saved by other code — an edited checkout of the same
    version — is not resumed by this one (it happened: a pass resumed into changed observer
    code and mixed two computations in one run)."""
    h = hashlib.sha256()
    for file in code_files():
        h.update(file.name.encode())
        h.update(file.read_bytes())
    return h.digest()


def fingerprint(model: ir.Model, *parts) -> str:
    """A key for a pass over `model`: moecompile's version and code, the model's source files
    (name, size, modification time), its history, and `parts` (tensors by their bytes,
    anything else by its repr)."""
    h = hashlib.sha256(__version__.encode())
    h.update(code_digest())
    source = Path(model.source)
    if source.is_dir():
        for f in sorted(source.iterdir()):
            if f.is_file():
                stat = f.stat()
                h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    h.update(repr(model.history).encode())
    h.update(repr(sorted(model.types.items())).encode())
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:32]


class Resume:
    """The saved state of one pass (a key from `fingerprint`)."""

    def __init__(self, key: str):
        self.folder = cache_root() / key
        self.file = self.folder / "state.pt"

    def load(self) -> dict | None:
        flush()
        if not self.file.exists():
            return None
        try:
            return torch.load(self.file, weights_only=False)
        except Exception:  # a state from a crash mid-write is never renamed in; be safe anyway
            return None

    def save(self, state: dict) -> None:
        """Write `state` (a copy of it, taken now) in the background, once the last write of
        this pass is done (its error, if any, is raised here)."""
        if self._pending is not None:
            self._pending.result()
        self._pending = _WRITER.submit(self._write, _snapshot(state))

    def _write(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(f".tmp-{os.getpid()}")
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.file)
        finally:
            tmp.unlink(missing_ok=True)

    def done(self) -> None:
        flush()
        if self._pending is not None:
            self._pending.result()
        shutil.rmtree(self.folder, ignore_errors=True)

    _pending = None  # this pass's last write


def _snapshot(value):
    """A copy of a state that later changes to the original cannot reach: containers rebuilt,
    tensors cloned (deepcopy's Python path per tensor cost 1 s of a 16-layer pass)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_snapshot(v) for v in value)
    return copy.deepcopy(value)


def flush() -> None:
    """Wait for every state write submitted so far."""
    _WRITER.submit(lambda: None).result()


def resume_for(model: ir.Model, calib, *what) -> Resume:
    """The saved state of a pass over `model` on calibration set `calib`; `what` names the
    pass and its settings."""
    return Resume(fingerprint(model, calib.ids, calib.mask, *what))
