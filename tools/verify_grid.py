"""Run the verifier's grid (moecompile/testing/verify_grid.py) and print its false alarms and
misses: the counts the README states. `--families`, `--scales`, `--kinds` take subsets.

    python tools/verify_grid.py [--work DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from moecompile.testing import verify_grid as grid
from moecompile.testing.models import train_tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="where checkpoints and files go")
    ap.add_argument("--families", default=",".join(grid.FAMILIES))
    ap.add_argument("--scales", default=",".join(map(str, grid.SCALES)))
    ap.add_argument("--kinds", default=",".join(grid.KINDS))
    ap.add_argument("--json", type=Path, default=None, help="write every cell here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="moecompile-grid-"))
    tokenizer = work / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        train_tokenizer(tokenizer)
    cells, start = [], time.time()
    for family in args.families.split(","):
        for scale in map(float, args.scales.split(",")):
            model = grid.build(family, scale, work / f"{family}-{scale}", tokenizer)
            for kind in args.kinds.split(","):
                for cell in grid.run_cells(model, family, scale, kind,
                                           work / f"{family}-{scale}-{kind}"):
                    cells.append(cell)
                    if cell.wrong:
                        print(f"WRONG {family} {scale} {kind} {cell.bug}: {cell.reason}",
                              flush=True)
            print(f"{family} {scale}: {len(cells)} cells, {time.time() - start:.0f} s",
                  flush=True)
    correct = [c for c in cells if c.bug is None]
    bugged = [c for c in cells if c.bug is not None]
    print("\n| | cells | wrong verdicts |\n|---|---:|---:|")
    for kind in args.kinds.split(","):
        of = [c for c in correct if c.kind == kind]
        print(f"| correct {kind} (must pass) | {len(of)} | {sum(c.wrong for c in of)} |")
    for bug in grid.BUGS:
        of = [c for c in bugged if c.bug == bug]
        if of:
            print(f"| bug {bug} (must fail) | {len(of)} | {sum(c.wrong for c in of)} |")
    print(f"\nfalse alarms {sum(c.wrong for c in correct)} of {len(correct)}, misses "
          f"{sum(c.wrong for c in bugged)} of {len(bugged)}, {time.time() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in cells], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
