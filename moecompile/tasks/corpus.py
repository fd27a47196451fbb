"""A language-model corpus that exists on every machine: the Python standard library's source.

No model hub or download is needed, and the text is real (code, docstrings, comments), so
perplexity on it says something about what compression did to the model. Files, not lines,
are assigned to splits (by a stable hash of the path relative to the stdlib folder), so the
test split is made of files the model never saw in training. Each split is capped so that
evaluations stay fast on a CPU.
"""

from __future__ import annotations

import hashlib
import sysconfig
from functools import lru_cache
from pathlib import Path

# Folders left out: third-party packages and the (huge, repetitive) test suites.
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# Bytes per split and per file (a file longer than the file cap is cut at a line boundary).
SPLIT_CAP = {"train": 600_000, "calib": 200_000, "test": 200_000}
FILE_CAP = 16_000


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def corpus_split_of(relpath: str) -> str:
    """train (80%), calib (10%) or test (10%) for a file path relative to the stdlib folder."""
    bucket = _hash("corpus/" + relpath) % 10
    return "test" if bucket == 0 else "calib" if bucket == 1 else "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """Sorted relative paths (POSIX style) of the stdlib's own .py files."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIP_PARTS.isdisjoint(rel.parts[:-1]) and path.is_file():
            files.append(rel.as_posix())
    return tuple(sorted(files))


def _read(relpath: str) -> str | None:
    try:
        text = (stdlib_root() / relpath).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if len(text) > FILE_CAP:
        cut = text.rfind("\n", 0, FILE_CAP)
        text = text[: cut + 1 if cut > 0 else FILE_CAP]
    return text if text.strip() else None


@lru_cache(maxsize=None)
def _corpus(split: str) -> tuple[tuple[str, str], ...]:
    # Take files in hash order (a fixed but well-mixed order over the sorted list) until the
    # split's cap is reached, so each split samples the whole library, not one package.
    chosen = [p for p in stdlib_files() if corpus_split_of(p) == split]
    chosen.sort(key=lambda p: (_hash("order/" + p), p))
    out, total = [], 0
    for rel in chosen:
        if total >= SPLIT_CAP[split]:
            break
        text = _read(rel)
        if text is not None:
            out.append((rel, text))
            total += len(text)
    return tuple(out)


def corpus_files(split: str) -> list[str]:
    """The relative paths whose texts `corpus_texts(split)` returns, in the same order."""
    _check(split)
    return [rel for rel, _ in _corpus(split)]


def corpus_texts(split: str) -> list[str]:
    """Texts of the stdlib source files assigned to `split` (one string per file)."""
    _check(split)
    return [text for _, text in _corpus(split)]


def _check(split: str) -> None:
    from .generators import SPLITS

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
