"""The bundled model's task suite as local benchmark files, for lm-eval and for --tasks.

    python -m moecompile.evaluation.suite_tasks OUT_DIR [--n 100]

writes OUT_DIR/moe_tiny_mc.jsonl (test-split prompts, each with its answer and three wrong
answers one edit away), OUT_DIR/moe_tiny_mc.yaml (the same as an lm-eval task: `dataset_path:
json`, no hub) and OUT_DIR/heldout.txt (held-out Python stdlib source, for --text). Why: a real
checkpoint is judged on ARC or MMLU, which the 5.7M-parameter bundled model cannot answer; these
files let the same lm-eval path (multiple choice by log-likelihood, paired against the original)
run on it, offline, with data nobody has to download.

Wrong answers are near misses so a model must know the answer, not merely its shape: one unit
replaced (a digit of a sum, a letter, a bracket) or two neighbours swapped. The JSONL fields,
{"prompt", "choices", "answer"}, are also the format of `tools/eval.py --tasks FILE.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from pathlib import Path

from ..tasks import TASKS, corpus_texts, examples

TASK_NAME = "moe_tiny_mc"
_ALPHABET = {"add": string.digits, "max": string.digits, "sort": string.digits,
             "rev": string.ascii_lowercase, "shift": string.ascii_lowercase,
             "brackets": ")]}>"}

YAML = """\
# The bundled model's task suite as multiple choice, written by
# python -m moecompile.evaluation.suite_tasks; local data, no hub.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _units(task: str, answer: str) -> tuple[list[str], str]:
    """The answer cut into the units a near miss changes, and the joiner that rebuilds it."""
    return (list(answer), "") if task == "add" else (answer.split(" "), " ")


def near_misses(task: str, prompt: str, answer: str, count: int = 3) -> list[str]:
    """`count` distinct wrong answers one edit from `answer`, the same for the same prompt."""
    rng = random.Random(f"mc/{prompt}")
    units, join = _units(task, answer)
    alphabet = _ALPHABET[task]
    out: list[str] = []
    for _ in range(1000):
        edited = list(units)
        i = rng.randrange(len(edited))
        if len(edited) > 1 and rng.random() < 0.3:
            j = i + 1 if i + 1 < len(edited) else i - 1
            edited[i], edited[j] = edited[j], edited[i]
        else:
            edited[i] = rng.choice([c for c in alphabet if c != edited[i]])
        wrong = join.join(edited)
        if wrong != answer and wrong not in out:
            out.append(wrong)
            if len(out) == count:
                break
    return out


def suite_documents(n: int = 100, tasks: tuple[str, ...] = TASKS,
                    split: str = "test") -> list[dict]:
    """`n` prompts per task (all of a task's split where it has fewer) as multiple choice."""
    docs = []
    for task in tasks:
        for ex in examples(task, split, n, at_most=True):
            answer = ex.answer.strip()
            choices = [answer] + near_misses(task, ex.prompt, answer)
            random.Random(f"order/{ex.prompt}").shuffle(choices)
            docs.append({"task": task, "prompt": ex.prompt, "choices": choices,
                         "answer": choices.index(answer)})
    return docs


def write_suite_task(out_dir: Path, n: int = 100, tasks: tuple[str, ...] = TASKS,
                     name: str = TASK_NAME) -> Path:
    """Write NAME.jsonl and NAME.yaml (data path absolute) into out_dir; returns the YAML."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in suite_documents(n, tasks)))
    yaml = out_dir / f"{name}.yaml"
    yaml.write_text(YAML.format(task=name, data=json.dumps(str(data))))
    return yaml


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n", type=int, default=100, help="test prompts per task")
    args = p.parse_args(argv)
    if args.n < 1:
        print("suite_tasks: error: --n must be at least 1", file=sys.stderr)
        return 2
    yaml = write_suite_task(args.out_dir, args.n)
    text = args.out_dir / "heldout.txt"
    text.write_text("\n".join(corpus_texts("test")))
    print(f"{yaml}\n{yaml.with_suffix('.jsonl')}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
