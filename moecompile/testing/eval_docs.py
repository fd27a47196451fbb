"""Documents for the evaluation tests: three per task kind, enough to pair, small enough to run
in every backend in seconds (multiple choice, text, generation, ARC-style)."""

from __future__ import annotations

from .models import BUNDLED, REPO as ROOT  # noqa: F401 (re-exported for the tests)

MC_DOCS = [
    {"prompt": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "None"], "answer": 0},
    {"prompt": "import os\nimport", "choices": ["sys", "json", "re"], "answer": 1},
    {"prompt": "for i in range(10):\n    print(i)\nreturn", "choices": ["i", "None", "10"],
     "answer": 2},
]
TEXT_DOCS = [
    {"text": "The quick brown fox jumps over the lazy dog. " * 3},
    {"text": "def main():\n    return 0\n\nif __name__ == '__main__':\n    main()\n"},
    {"text": "Lorem ipsum dolor sit amet, consectetur adipiscing elit."},
]
GEN_DOCS = [
    {"question": "x = 1\ny =", "answer": "2"},
    {"question": "import", "answer": "os"},
    {"question": "class A:\n   ", "answer": "pass"},
]
ARC_DOCS = [
    {"id": "t1", "question": "Which word ends a Python function that gives back a value?",
     "choices": {"text": ["return", "yield", "pass"], "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"id": "t2", "question": "What does import bring in?",
     "choices": {"text": ["a module", "a loop"], "label": ["A", "B"]}, "answerKey": "A"},
    {"id": "t3", "question": "What is 2 + 2?",
     "choices": {"text": ["3", "4", "5", "22"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
]
