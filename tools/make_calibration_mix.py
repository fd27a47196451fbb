"""Write the built-in calibration mix that `--calib default` (and every calibrated flag without
`--calib`) uses: moecompile/data/calibration_mix.txt.

    python tools/make_calibration_mix.py [--kib 300]

A general text mix, so a model is calibrated on the kinds of text people give it rather than
on one task: prose, code and numbers, interleaved in chunks of about a thousand characters (the
size `--calib FILE.txt` cuts a file into), so the first N chunks of the file — what `--calib-n
N` takes — are already a mix.

- prose: Python's language reference and library topics as shipped with CPython
  (`pydoc_data/topics.py`, PSF License);
- code: standard-library source files of the corpus's *calib* split (moecompile/tasks/corpus.py),
  never its *test* split, so perplexity on the test split stays held out;
- numbers: seeded arithmetic, tables, dates, measurements and lists.

The file is generated once and shipped, so a calibration does not depend on the Python version
a user runs; rerunning this tool on another CPython may produce different text.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from moecompile.tasks.calibration import CHUNK_CHARS
from moecompile.tasks.corpus import corpus_texts

OUT = Path(__file__).resolve().parents[1] / "moecompile" / "data" / "calibration_mix.txt"
SEED = 20261203


def prose_chunks() -> list[str]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return _chunks(text)


def code_chunks() -> list[str]:
    return _chunks("\n".join(corpus_texts("calib")))


def number_chunks(rng: random.Random, n: int) -> list[str]:
    makers = [_arithmetic, _table, _dates, _measurements, _series]
    return [makers[i % len(makers)](rng) for i in range(n)]


def _chunks(text: str) -> list[str]:
    """Whole lines, about CHUNK_CHARS each."""
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        current += line
        if len(current) >= CHUNK_CHARS:
            out.append(current)
            current = ""
    return out


def _fill(rng: random.Random, line) -> str:
    text = ""
    while len(text) < CHUNK_CHARS:
        text += line(rng) + "\n"
    return text


def _arithmetic(rng: random.Random) -> str:
    def line(r):
        a, b = r.randint(0, 10**r.randint(1, 6)), r.randint(1, 10**r.randint(1, 4))
        op = r.choice("+-*/")
        value = {"+": a + b, "-": a - b, "*": a * b, "/": round(a / b, 4)}[op]
        return f"{a} {op} {b} = {value}"
    return _fill(rng, line)


def _table(rng: random.Random) -> str:
    names = ["north", "south", "east", "west", "central", "harbor", "valley", "ridge"]
    head = "region,year,units,price,revenue\n"

    def line(r):
        units, price = r.randint(10, 99999), round(r.uniform(0.5, 250.0), 2)
        return f"{r.choice(names)},{r.randint(1990, 2026)},{units},{price},{round(units * price, 2)}"
    return head + _fill(rng, line)


def _dates(rng: random.Random) -> str:
    months = ["January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December"]

    def line(r):
        y, m, d = r.randint(1900, 2030), r.randint(1, 12), r.randint(1, 28)
        h, mi = r.randint(0, 23), r.randint(0, 59)
        return f"{y}-{m:02d}-{d:02d} {h:02d}:{mi:02d} ({d} {months[m - 1]} {y})"
    return _fill(rng, line)


def _measurements(rng: random.Random) -> str:
    units = [("km", 1, 5000), ("kg", 0.1, 900), ("°C", -40, 45), ("MB", 1, 65536),
             ("ms", 0.01, 2000), ("%", 0, 100)]

    def line(r):
        unit, lo, hi = r.choice(units)
        return f"sample {r.randint(1, 9999)}: {round(r.uniform(lo, hi), r.randint(0, 3))} {unit}"
    return _fill(rng, line)


def _series(rng: random.Random) -> str:
    def line(r):
        start, step = r.randint(-100, 100), r.randint(1, 17)
        return ", ".join(str(start + step * i) for i in range(r.randint(5, 12)))
    return _fill(rng, line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kib", type=int, default=300, help="size of the mix (default 300 KiB)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    rng = random.Random(SEED)
    prose, code = prose_chunks(), code_chunks()
    rng.shuffle(prose)
    rng.shuffle(code)
    n = args.kib * 1024 // CHUNK_CHARS // 3
    numbers = number_chunks(rng, n)
    mix = []
    for i in range(n):  # interleaved, so any prefix of chunks is a mix
        mix += [prose[i % len(prose)], code[i % len(code)], numbers[i]]
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text("".join(mix), encoding="utf-8")
    print(f"wrote {args.out}: {len(mix)} chunks, {args.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
