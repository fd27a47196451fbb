"""The task generators: one small, distinct skill each, in a one-line prompt format.

Every prompt names its task, ends with "=" and is answered by a line that starts with a space
and ends with "\\n", e.g. ``add 12+45=`` -> `` 57\\n``. The leading space is deliberate:
with the byte-level BPE (qwen2 pre-tokenizer) of the trained model, "=" never merges with a
following space, so tokenizing ``prompt + answer`` as one text gives exactly the tokens of the
prompt followed by those of the answer. Training, greedy evaluation and perplexity/KL on whole
examples therefore all see the same token sequence. Letters and brackets are space-separated
for the same reason: each becomes its own token instead of an arbitrary BPE merge.

Inputs are kept short (2-digit numbers, lists and strings of at most 6 items) so a
model of a few million parameters learns every task on a CPU in minutes, but each task needs a
different skill: carrying (add), comparison (sort), position reversal (rev), an aggregate over
the whole list (max), a stack (brackets), a memorised lookup table (shift).
"""

from __future__ import annotations

import hashlib
import random
import string
from typing import Callable

Generator = Callable[[random.Random], "tuple[str, str]"]

LETTERS = string.ascii_lowercase
OPEN_CLOSE = {"(": ")", "[": "]", "{": "}", "<": ">"}


def gen_add(rng: random.Random) -> tuple[str, str]:
    """Addition of two 2-digit numbers whose sum has two digits, everything zero-padded so
    digits align by position: needs the carry from the units into the tens. (Sums up to 198
    need the carry resolved two digits ahead before the first digit is written; the 3-layer
    model did not learn that within its 30-minute CPU budget in two trial runs.)"""
    a = rng.randint(0, 99)
    b = rng.randint(0, 99 - a)
    return f"add {a:02d}+{b:02d}=", f" {a + b:02d}\n"


def gen_sort(rng: random.Random) -> tuple[str, str]:
    """Sort 3-5 single digits ascending: needs comparison/counting."""
    items = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return f"sort {' '.join(map(str, items))}=", f" {' '.join(map(str, sorted(items)))}\n"


def gen_rev(rng: random.Random) -> tuple[str, str]:
    """Reverse 3-6 space-separated letters: needs positional copying."""
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
    return f"rev {' '.join(letters)}=", f" {' '.join(reversed(letters))}\n"


def gen_max(rng: random.Random) -> tuple[str, str]:
    """The largest of 3-6 single digits: one token that depends on the whole list at once.

    (It replaced key-value recall: in a 3-layer model on a CPU budget, recall needs an
    induction circuit that did not form within 30 minutes in three trial runs.)"""
    items = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    return f"max {' '.join(map(str, items))}=", f" {max(items)}\n"


def gen_brackets(rng: random.Random) -> tuple[str, str]:
    """Close a valid prefix of 2-6 brackets (some pairs already closed): needs a stack."""
    length = rng.randint(2, 6)
    tokens: list[str] = []
    stack: list[str] = []
    for i in range(length):
        remaining = length - i
        # Close only when something is open and the prefix can still end with an open bracket.
        if stack and remaining > 1 and rng.random() < 0.4:
            tokens.append(OPEN_CLOSE[stack.pop()])
        else:
            stack.append(rng.choice(list(OPEN_CLOSE)))
            tokens.append(stack[-1])
    return f"brackets {' '.join(tokens)} =", f" {' '.join(OPEN_CLOSE[b] for b in reversed(stack))}\n"


def gen_shift(rng: random.Random) -> tuple[str, str]:
    """Shift 3-6 letters forward in the alphabet by 1-5 (z wraps to a): a per-token lookup
    table (26 x 5 entries), the kind of knowledge stored in feed-forward (expert) weights."""
    k = rng.randint(1, 5)
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
    shifted = [LETTERS[(LETTERS.index(c) + k) % 26] for c in letters]
    return f"shift {k} {' '.join(letters)}=", f" {' '.join(shifted)}\n"


GENERATORS: dict[str, Generator] = {
    "add": gen_add,
    "sort": gen_sort,
    "rev": gen_rev,
    "max": gen_max,
    "brackets": gen_brackets,
    "shift": gen_shift,
}

SPLITS = ("train", "calib", "test")
# Share of the prompt space per split, in percent of the prompt hash (train gets the rest).
_SPLIT_BOUNDS = (("train", 80), ("calib", 90), ("test", 100))


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from a stable hash of the prompt itself.

    Disjointness across splits therefore holds by construction, whatever the seeds: a prompt
    can only ever be generated for one split.
    """
    bucket = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big") % 100
    for name, bound in _SPLIT_BOUNDS:
        if bucket < bound:
            return name
    raise AssertionError("unreachable")
