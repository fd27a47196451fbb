"""Calibration data for compression passes, from a short user-facing spec.

A pass that prunes or merges experts needs inputs that exercise the model the way it will be
used. The spec is one string so it fits a CLI flag:

- ``add,sort`` or ``all``: examples of those tasks from the *calib* split (never the test
  split, so a pass calibrated on them is still judged fairly), `n` per task;
- ``FILE.jsonl``: one ``{"prompt": ..., "answer": ...}`` object per line (the user's own task),
  returned as Examples of task "file" (first `n` lines);
- ``FILE.txt``: plain text, cut into chunks at line boundaries (first `n` chunks), for
  perplexity- or KL-based calibration;
- ``default``: the built-in general mix of prose, code and numbers the package ships
  (moecompile/data/calibration_mix.txt, made by tools/make_calibration_mix.py), read like a
  ``.txt``: what every calibrated flag uses when no ``--calib`` is given.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .examples import TASKS, Example, examples

CHUNK_CHARS = 1000  # a .txt chunk: whole lines, about this many characters
DEFAULT = "default"
DEFAULT_MIX = Path(__file__).resolve().parents[1] / "data" / "calibration_mix.txt"


def load_calibration(spec: str, n: int = 64, skip: int = 0) -> list[Example] | list[str]:
    """`n` items of the spec (per task for task names) after the first `skip`: `skip=n` gives a
    held-out set of the same kind as the first `n` (what --allow-prune measures structures on,
    so a refit or a search is not judged on the data it was fitted to)."""
    items = _load(spec, n + skip)
    if not skip:
        return items
    if items and isinstance(items[0], Example):
        by_task: dict[str, list] = {}
        for ex in items:
            by_task.setdefault(ex.task, []).append(ex)
        items = [ex for exs in by_task.values() for ex in exs[skip:]]
    else:
        items = items[skip:]
    if not items:
        raise UserError(f"calibration '{spec}' has nothing beyond its first {skip} items")
    return items


def _load(spec: str, n: int) -> list[Example] | list[str]:
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("empty calibration spec; give task names (e.g. 'add,sort' or 'all'), "
                        "a .jsonl file or a .txt file")
    if n < 1:
        raise UserError(f"calibration size must be at least 1, got {n}")
    spec = spec.strip()
    if spec == DEFAULT:
        return _text(DEFAULT_MIX, n)
    if spec.endswith(".jsonl"):
        return _jsonl(Path(spec), n)
    if spec.endswith(".txt"):
        return _text(Path(spec), n)
    names = list(TASKS) if spec == "all" else [t.strip() for t in spec.split(",")]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown calibration task(s) {', '.join(repr(t) for t in unknown)} in "
                        f"'{spec}'; known: {', '.join(TASKS)}, 'all', 'default' or a "
                        ".jsonl/.txt file")
    out: list[Example] = []
    for task in dict.fromkeys(names):  # de-duplicated, order kept
        out += examples(task, "calib", n)
    return out


def _read(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"calibration file {path} not found")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"calibration file {path} cannot be read as UTF-8 text: {exc}") from None


def _jsonl(path: Path, n: int) -> list[Example]:
    out = []
    for number, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
                and isinstance(row.get("answer"), str)):
            raise UserError(f"{path}:{number}: expected an object with string fields "
                            "'prompt' and 'answer'")
        out.append(Example("file", row["prompt"], row["answer"]))
        if len(out) == n:
            break
    if not out:
        raise UserError(f"calibration file {path} has no examples")
    return out


def _text(path: Path, n: int) -> list[str]:
    chunks, current = [], ""
    for line in _read(path).splitlines(keepends=True):
        current += line
        if len(current) >= CHUNK_CHARS:
            chunks.append(current)
            current = ""
            if len(chunks) == n:
                return chunks
    if current.strip():
        chunks.append(current)
    if not chunks:
        raise UserError(f"calibration file {path} is empty")
    return chunks[:n]
