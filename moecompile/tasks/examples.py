"""Examples of the tasks, split-disjoint and reproducible, and how completions are scored.

`examples(task, split, n, seed)` draws prompts from the task's generator with a random stream
seeded by (task, split, seed) and keeps those whose prompt hash puts them in `split`
(`generators.split_of`): disjointness across splits holds by construction, not by luck of the
seeds. Prompts within one call are distinct.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .generators import GENERATORS, SPLITS, split_of

TASKS: tuple[str, ...] = tuple(GENERATORS)


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str  # starts with a space, ends with "\n"


def examples(task: str, split: str, n: int, seed: int = 0, at_most: bool = False) -> list[Example]:
    """`n` distinct examples of `task` from `split`; the same arguments give the same list, and
    a smaller `n` its prefix. Some tasks have few distinct prompts (add: about 500 per split):
    asking for more raises ValueError, or with `at_most` gives all the split has."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    rng = random.Random(f"{task}/{split}/{seed}")  # str seeds hash stably (sha512)
    generate = GENERATORS[task]
    out: list[Example] = []
    seen: set[str] = set()
    budget = 1000 + 200 * n
    while len(out) < n:
        budget -= 1
        if budget < 0:
            if at_most:
                break
            raise ValueError(f"task {task!r} has fewer than {n} distinct {split} prompts")
        prompt, answer = generate(rng)
        if prompt in seen or split_of(prompt) != split:
            continue
        seen.add(prompt)
        out.append(Example(task, prompt, answer))
    return out


def completion_answer(text: str) -> str:
    """What a completion answers: its text up to the first newline (all of it if none)."""
    end = text.find("\n")
    return text if end < 0 else text[:end]


def score(example: Example, completion: str) -> bool:
    """Exact match of the completion's answer line with the expected answer (without "\\n")."""
    return completion_answer(completion) == completion_answer(example.answer)
