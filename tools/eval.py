"""Measure what compression cost: task accuracy, perplexity and KL to the original model.

    python tools/eval.py MODEL [--base BASE] [--tasks add,sort,...|all] [--ppl] [--n N] [--json OUT]

MODEL and BASE are each a Hugging Face folder (run in transformers), a .gguf file (run in
llama.cpp) or an .onnx file written by moecompile (run in ONNX Runtime, with the tokenizer beside
it). Exit code 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from moecompile.errors import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--base", help="the original model to compare against (KL, top-1 agreement)")
    p.add_argument("--tasks", default="all", help="comma-separated task names, 'all' or 'none'")
    p.add_argument("--ppl", action="store_true", help="perplexity on held-out stdlib source")
    p.add_argument("--n", type=int, default=200,
                   help="test examples per task (all of a task's test split where it has "
                   "fewer: add has 509)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        from moecompile.evaluation import evaluate, format_table
        from moecompile.tasks import TASKS

        tasks = parse_tasks(args.tasks, TASKS)
        if args.n < 1:
            raise UserError("--n must be at least 1")
        result = evaluate(args.model, args.base, tasks, args.n, args.ppl, args.batch_size,
                          progress=not args.quiet)
    except UserError as exc:
        print(f"eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def parse_tasks(spec: str, known: tuple[str, ...]) -> list[str]:
    if spec == "all":
        return list(known)
    if spec == "none":
        return []
    tasks = [t for t in spec.split(",") if t]
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return tasks


if __name__ == "__main__":
    sys.exit(main())
