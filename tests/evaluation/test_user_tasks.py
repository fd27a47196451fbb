"""The user's own JSONL tasks (--tasks FILE.jsonl), without lm-eval."""

from __future__ import annotations

import json

import pytest

from moecompile.errors import UserError
from moecompile.evaluation.backends import HFBackend
from moecompile.evaluation.loglik import continuation_logprobs, encode_pair
from moecompile.evaluation.user_tasks import (load_user_tasks, score_generation,
                                              score_multiple_choice, score_user_tasks)
from moecompile.tasks import examples, score

from moecompile.testing.eval_docs import BUNDLED


@pytest.fixture(scope="module")
def bundled():
    return HFBackend(BUNDLED)


def test_generation_exact_match_agrees_with_the_suites_own_scorer(bundled):
    """The bundled (trained) model on built-in test prompts written as user tasks: each outcome
    is the built-in scorer's verdict on the model's own greedy completion."""
    exs = examples("add", "test", 6) + examples("sort", "test", 6)
    docs = [{"kind": "generation", "prompt": e.prompt, "answer": e.answer.strip()} for e in exs]
    got = score_generation(bundled, docs, batch_size=4)
    completions = bundled.greedy([bundled.encode(e.prompt) for e in exs], 16)
    expected = [float(score(e, bundled.decode(c))) for e, c in zip(exs, completions)]
    assert [r["score"] for r in got] == expected
    assert sum(expected) >= 6  # the trained model answers most of them: the test sees both kinds
    wrong = [{**d, "answer": d["answer"] + "0"} for d in docs[:3]]
    assert [r["score"] for r in score_generation(bundled, wrong)] == [0.0] * 3


def test_multiple_choice_picks_the_highest_log_likelihood(bundled):
    docs = [{"kind": "multiple_choice", "prompt": "add 21+34=", "choices": ["55", "56", "45"],
             "answer": 0},
            {"kind": "multiple_choice", "prompt": "Answer:\n", "choices": ["yes", "no"],
             "answer": 1}]
    got = score_multiple_choice(bundled, docs)
    for doc, r in zip(docs, got):
        sep = "" if doc["prompt"][-1].isspace() else " "  # one space, unless there is one
        requests = [encode_pair(bundled.encode, doc["prompt"], sep + c) for c in doc["choices"]]
        lls = [lp for lp, _ in continuation_logprobs(bundled, requests)]
        assert r["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        assert r["picked"] == max(range(len(lls)), key=lls.__getitem__)
        assert r["score"] == float(r["picked"] == doc["answer"])
    assert got[0]["score"] == 1.0  # 21+34: the trained model knows


def test_file_with_both_kinds_gives_two_benchmarks(bundled, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in [
        {"prompt": "max 3 9 1=", "choices": ["9", "3"], "answer": "9"},
        {"prompt": "rev a b c=", "answer": "c b a"},
        {"prompt": "max 1 2 7=", "choices": ["2", "7"], "answer": 1}]) + "\n\n")
    docs = load_user_tasks(path)
    assert [d["kind"] for d in docs] == ["multiple_choice", "generation", "multiple_choice"]
    assert docs[0]["answer"] == 0  # given as the choice's text
    out = score_user_tasks(bundled, docs, "mine")
    assert set(out) == {"mine (multiple choice)", "mine (generation)"}
    assert set(out["mine (multiple choice)"]["metrics"]["acc"]["per_doc"]) == {"0", "2"}
    assert set(out["mine (generation)"]["metrics"]["exact_match"]["per_doc"]) == {"1"}


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ('{"choices": ["a", "b"], "answer": 0}', 'non-empty "prompt"'),
    ('{"prompt": "x", "choices": ["a"], "answer": 0}', "at least two"),
    ('{"prompt": "x", "choices": ["a", "b"], "answer": 2}', "index of a choice"),
    ('{"prompt": "x", "choices": ["a", "b"], "answer": "c"}', "index of a choice"),
    ('{"prompt": "x"}', 'non-empty "answer"'),
])
def test_bad_lines_are_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(UserError, match=message) as err:
        load_user_tasks(path)
    assert str(err.value).startswith(f"{path}:2:")


def test_cli_user_tasks_against_base_and_bad_file(compiled, tmp_path, capsys, eval_main):
    path = tmp_path / "mine.jsonl"
    rows = [("import", ["os", "sys"]), ("def f():\n    return", ["None", "1"]), ("x =", ["1", "y"])]
    path.write_text("".join(json.dumps({"prompt": p, "choices": c, "answer": 0}) + "\n"
                            for p, c in rows))
    out = tmp_path / "r.json"
    assert eval_main([str(compiled["gguf"]), "--base", str(compiled["hf"]), "--tasks", str(path),
                      "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| mine (multiple choice) | acc | 3 |" in printed
    data = json.loads(out.read_text())
    entry = data["tasks"]["mine (multiple choice)"]
    assert entry["metrics"]["acc"]["paired"]["n"] == 3
    model_ll = [r["loglikelihoods"] for r in entry["outputs"]["model"].values()]
    base_ll = [r["loglikelihoods"] for r in entry["outputs"]["base"].values()]
    assert len(model_ll) == 3 and all(a == pytest.approx(b, abs=2e-3)
                                      for a, b in zip(model_ll, base_ll))
    path.write_text('{"prompt": "x", "choices": ["a", "b"], "answer": 5}\n')
    assert eval_main([str(compiled["hf"]), "--tasks", str(path), "--quiet"]) == 2
    assert f"{path}:1:" in capsys.readouterr().err
