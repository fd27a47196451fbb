"""Measure what compression cost: benchmarks, perplexity and KL, compiled file against original.

    python tools/eval.py MODEL [--base BASE]
        [--lm-eval arc_easy,hellaswag,...|TASK.yaml [--lm-eval-include DIR]
                   [--num-fewshot K] [--limit N]]
        [--tasks add,sort,...|all|none|FILE.jsonl [--n N]]
        [--text FILE | --ppl] [--ctx 512] [--chunks N]
        [--json OUT] [--max-memory SIZE] [--max-length N] [--batch-size B] [--quiet]

MODEL and BASE are each a Hugging Face folder (run in transformers, float32), a .gguf file (run
in llama.cpp, in this process) or an .onnx file written by moecompile (run in ONNX Runtime, with
the tokenizer beside it). --lm-eval runs lm-evaluation-harness tasks (pip install -e '.[eval]');
--tasks runs the bundled model's built-in suite or the user's own JSONL tasks; --text reports
perplexity and, with --base, KL(base||model), same-top-1 and RMS Δp in llama-perplexity's
convention (with --base and no text, on held-out Python source). With --base every benchmark
runs on both, with the difference and its paired 95% CI. Exit code 2 with one line on bad
input. See docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from moecompile.errors import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--base", help="the original model to compare against")
    p.add_argument("--lm-eval", metavar="TASKS",
                   help="comma-separated lm-evaluation-harness tasks/groups (arc_easy, "
                   "hellaswag, mmlu, gsm8k, ...) or task YAML files")
    p.add_argument("--lm-eval-include", metavar="DIR", action="append", default=[],
                   help="a folder of lm-eval task YAMLs (repeatable)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument("--limit", type=float,
                   help="at most N documents per lm-eval task (a fraction if below 1)")
    p.add_argument("--tasks", help="built-in task names, 'all' or 'none', or a .jsonl of your "
                   "own prompts (default: all built-in tasks unless --lm-eval or --text is given)")
    p.add_argument("--n", type=int, default=200,
                   help="test examples per built-in task (all of a task's test split where it "
                   "has fewer: add has 509)")
    p.add_argument("--text", help="a UTF-8 text file: perplexity, and with --base the KL report")
    p.add_argument("--ppl", action="store_true",
                   help="perplexity (and KL with --base) on held-out Python stdlib source")
    p.add_argument("--ctx", type=int, default=512,
                   help="tokens per chunk of the text (llama-perplexity's -c; capped at the "
                   "models' context)")
    p.add_argument("--chunks", type=int, help="at most this many chunks of the text")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int,
                   help="longest sequence given to a model (n_ctx of a .gguf, default 1024)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="refuse an HF folder whose evaluation in transformers needs more than "
                   "this (default: the memory available now)")
    p.add_argument("--json", help="also write the results as JSON here (every document's outcome)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--verbose", action="store_true", help="lm-eval's own log messages")
    args = p.parse_args(argv)
    if args.quiet:  # progress bars of lm-eval, datasets and transformers too (read at import)
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from moecompile.evaluation.compare import Plan, compare
        from moecompile.evaluation.report import format_report

        result = compare(args.model, args.base, make_plan(args, Plan))
    except UserError as exc:
        print(f"eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def make_plan(args, Plan):
    """The Plan the arguments ask for, or a UserError naming the bad one."""
    from pathlib import Path

    from moecompile.sizes import parse_size
    from moecompile.tasks import TASKS

    for flag, value, low in (("--n", args.n, 1), ("--ctx", args.ctx, 4),
                             ("--batch-size", args.batch_size, 1), ("--chunks", args.chunks, 1),
                             ("--max-length", args.max_length, 8),
                             ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be at least {low}")
    if args.text and args.ppl:
        raise UserError("--text and --ppl both name the text to report on; give one")
    if args.text and not Path(args.text).is_file():
        raise UserError(f"--text {args.text}: no such file")
    limit = args.limit
    if limit is not None:
        if limit <= 0 or (limit >= 1 and limit != int(limit)):
            raise UserError("--limit is a number of documents (1, 2, ...) or a fraction below 1")
        limit = int(limit) if limit >= 1 else limit
    lm_eval = [t for t in (args.lm_eval or "").split(",") if t]
    spec = args.tasks or ("none" if lm_eval or args.text or args.ppl else "all")
    builtin, user = [], None
    if spec.endswith(".jsonl"):
        if not Path(spec).is_file():
            raise UserError(f"--tasks {spec}: no such file")
        user = Path(spec)
    else:
        builtin = parse_tasks(spec, TASKS)
    return Plan(builtin_tasks=builtin, n=args.n, user_tasks=user, lm_eval=lm_eval,
                lm_eval_include=args.lm_eval_include, num_fewshot=args.num_fewshot, limit=limit,
                text=Path(args.text) if args.text else None,
                builtin_text=args.ppl or (args.base is not None and not args.text),
                ctx=args.ctx, chunks=args.chunks, batch_size=args.batch_size,
                max_length=args.max_length,
                max_memory=parse_size(args.max_memory, "--max-memory") if args.max_memory else None,
                progress=not args.quiet, verbose=args.verbose)


def parse_tasks(spec: str, known: tuple[str, ...]) -> list[str]:
    if spec == "all":
        return list(known)
    if spec == "none":
        return []
    tasks = [t for t in spec.split(",") if t]
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(known)} "
                        "(or a .jsonl file of your own)")
    return tasks


if __name__ == "__main__":
    sys.exit(main())
