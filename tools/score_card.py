"""Write the bundled model's per-runtime accuracy table into its model card.

    python tools/score_card.py models/moe-tiny [--n 200]

Compiles the model to F32 and Q8_0 GGUF with moecompile (verified), evaluates the Hugging Face
folder (transformers) and both GGUF files (llama.cpp) on every task's test split with the same
n, and replaces the card's "## Accuracy by runtime" section with the table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from moecompile.cli import main as compile_main
from moecompile.evaluation import evaluate
from moecompile.tasks import TASKS

SECTION = "## Accuracy by runtime"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--n", type=int, default=200)
    args = p.parse_args()
    columns = {"transformers (HF folder)": str(args.model)}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("f32", "q8_0"):
            out = Path(tmp) / f"model-{dtype}.gguf"
            if compile_main([str(args.model), "-o", str(out), "--dtype", dtype, "--quiet"]) != 0:
                sys.exit(f"compiling {dtype} failed")
            columns[f"llama.cpp {dtype.upper()} GGUF"] = str(out)
        scores = {name: evaluate(path, tasks=list(TASKS), n=args.n)["tasks"]
                  for name, path in columns.items()}
    lines = [SECTION, "",
             f"Greedy exact match on the test split, n={args.n} per task, the same prompts in "
             "each runtime (`python tools/score_card.py`; GGUF files compiled and verified by "
             "moecompile):", "",
             "| task | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for task in TASKS:
        lines.append(f"| {task} | " + " | ".join(f"{scores[c][task]['accuracy']:.3f}"
                                                 for c in columns) + " |")
    table = "\n".join(lines) + "\n"
    card = args.model / "README.md"
    text = card.read_text()
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        text = head + table + ("\n" + tail.lstrip("\n") if tail else "")
    else:
        marker = "## Routing"
        text = text.replace(marker, table + "\n" + marker, 1) if marker in text else text + "\n" + table
    card.write_text(text)
    print(table)


if __name__ == "__main__":
    main()
