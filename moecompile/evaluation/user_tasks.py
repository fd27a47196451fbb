"""The user's own prompts as a benchmark: `tools/eval.py MODEL --tasks FILE.jsonl`.

Standard benchmarks say little about a model fine-tuned for, or used on, one job; a few hundred
of the user's own prompts with known answers say whether the compiled file still does that
job. Needs no lm-eval: one JSON object per line, either

    {"prompt": "The capital of France is", "choices": ["Paris", "Rome"], "answer": 0}

multiple choice, decided by log-likelihood (the choice with the highest sum of token
log-probabilities after the prompt, lm-eval's `acc`); `answer` is the index of the right
choice or its text. A choice follows the prompt after one space, as lm-eval's
`target_delimiter` puts it, unless the prompt ends in whitespace or the choice starts with it.

    {"prompt": "add 12+34=", "answer": "46"}

generation, decided by exact match: the greedy completion (at most the answer's length plus 4
tokens, stopping at end-of-sequence) up to its first newline, stripped of surrounding
whitespace, must equal the answer stripped.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .backends import Backend
from .loglik import continuation_logprobs, encode_pair
from .paired import mean_ci


def load_user_tasks(path: Path) -> list[dict]:
    """The file's documents, checked line by line: {"prompt", "choices"?, "answer"}."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    docs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("prompt"), str) or not doc["prompt"]:
            raise UserError(f'{where}: expected an object with a non-empty "prompt" string')
        choices, answer = doc.get("choices"), doc.get("answer")
        if choices is None:
            if not isinstance(answer, str) or not answer.strip():
                raise UserError(f'{where}: a generation task needs a non-empty "answer" string')
            docs.append({"kind": "generation", "prompt": doc["prompt"], "answer": answer})
            continue
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)):
            raise UserError(f'{where}: "choices" must be a list of at least two non-empty strings')
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if (isinstance(answer, bool) or not isinstance(answer, int)
                or not 0 <= answer < len(choices)):
            raise UserError(f'{where}: "answer" must be the index of a choice '
                            f"(0-{len(choices) - 1}) or one of the choices")
        docs.append({"kind": "multiple_choice", "prompt": doc["prompt"], "choices": choices,
                     "answer": answer})
    if not docs:
        raise UserError(f"{path}: no tasks (one JSON object per line)")
    return docs


def _continuation(prompt: str, choice: str) -> str:
    return choice if prompt[-1].isspace() or choice[0].isspace() else " " + choice


def _prefixed(backend: Backend, ids: list[int]) -> list[int]:
    """BOS in front where the model's tokenizer puts it there (as lm-eval's model does)."""
    return [backend.bos] + ids if backend.add_bos and backend.bos is not None else ids


def score_multiple_choice(backend: Backend, docs: list[dict], batch_size: int = 8) -> list[dict]:
    """Per document: the log-likelihood of each choice, the one picked, and 1/0 correct."""
    requests, owner = [], []
    for i, doc in enumerate(docs):
        for choice in doc["choices"]:
            ctx, cont = encode_pair(backend.encode, doc["prompt"],
                                    _continuation(doc["prompt"], choice))
            requests.append((_prefixed(backend, ctx), cont))
            owner.append(i)
    scores: list[list[float]] = [[] for _ in docs]
    for i, (logprob, _) in zip(owner, continuation_logprobs(backend, requests,
                                                            batch_size=batch_size)):
        scores[i].append(logprob)
    out = []
    for doc, lls in zip(docs, scores):
        picked = max(range(len(lls)), key=lls.__getitem__)
        out.append({"loglikelihoods": lls, "picked": picked,
                    "score": float(picked == doc["answer"])})
    return out


def score_generation(backend: Backend, docs: list[dict], batch_size: int = 8) -> list[dict]:
    """Per document: the completion's answer line and 1/0 exact match."""
    out = []
    for start in range(0, len(docs), batch_size):
        batch = docs[start:start + batch_size]
        max_new = max(len(backend.encode(" " + d["answer"])) for d in batch) + 4
        prompts = [_prefixed(backend, backend.encode(d["prompt"])) for d in batch]
        for doc, new in zip(batch, backend.greedy(prompts, max_new)):
            line = backend.decode(new).split("\n", 1)[0].strip()
            out.append({"completion": line, "score": float(line == doc["answer"].strip())})
    return out


def score_user_tasks(backend: Backend, docs: list[dict], name: str,
                     batch_size: int = 8) -> dict:
    """Benchmarks named `name (multiple choice)` / `name (generation)` for the kinds present,
    each {metric, value, n, per_doc: [{doc, score, ...}]}."""
    out = {}
    for kind, metric, scorer in (("multiple_choice", "acc", score_multiple_choice),
                                 ("generation", "exact_match", score_generation)):
        index = [i for i, d in enumerate(docs) if d["kind"] == kind]
        if not index:
            continue
        results = scorer(backend, [docs[i] for i in index], batch_size)
        out[f"{name} ({kind.replace('_', ' ')})"] = {
            "metrics": {metric: {"value": mean_ci([r["score"] for r in results])["mean"],
                                 "per_doc": {str(i): r["score"] for i, r in zip(index, results)}}},
            "outputs": {str(i): r for i, r in zip(index, results)}}
    return out
