"""The task suite: split-disjoint, reproducible, scored exactly; corpus and calibration specs."""

from __future__ import annotations

import json

import pytest

from moecompile.errors import UserError
from moecompile.tasks import (SPLITS, TASKS, Example, completion_answer, corpus_files,
                              corpus_texts, examples, load_calibration, score, split_of)
from moecompile.tasks.corpus import corpus_split_of


def test_public_api_shape():
    assert SPLITS == ("train", "calib", "test")
    assert len(TASKS) >= 5 and len(set(TASKS)) == len(TASKS)
    ex = examples(TASKS[0], "test", 1)[0]
    assert isinstance(ex, Example) and ex.task == TASKS[0]
    with pytest.raises(Exception):
        ex.prompt = "x"  # frozen


@pytest.mark.parametrize("task", TASKS)
def test_splits_disjoint_and_well_formed(task):
    by_split = {s: examples(task, s, 300 if s == "train" else 200) for s in SPLITS}
    prompts = {s: {e.prompt for e in exs} for s, exs in by_split.items()}
    for s, exs in by_split.items():
        assert len(prompts[s]) == len(exs), "prompts within a split are distinct"
        for e in exs:
            assert split_of(e.prompt) == s
            assert e.prompt.startswith(task + " ") and e.prompt.endswith("=")
            assert "\n" not in e.prompt
            assert e.answer.startswith(" ") and e.answer.endswith("\n")
            assert e.answer.count("\n") == 1
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["calib"]
    assert not prompts["calib"] & prompts["test"]
    # Other seeds draw other examples, but never cross a split.
    other = {e.prompt for e in examples(task, "train", 300, seed=7)}
    assert other != prompts["train"] and not other & (prompts["test"] | prompts["calib"])


@pytest.mark.parametrize("task", TASKS)
def test_deterministic(task):
    assert examples(task, "test", 50) == examples(task, "test", 50)
    assert examples(task, "test", 20) == examples(task, "test", 50)[:20]
    assert examples(task, "test", 50, seed=1) != examples(task, "test", 50)


def test_a_split_with_fewer_prompts_than_asked_gives_all_it_has_only_when_allowed():
    with pytest.raises(ValueError, match="fewer than 1000 distinct test prompts"):
        examples("add", "test", 1000)
    every = examples("add", "test", 1000, at_most=True)
    assert 400 < len(every) < 1000 and len({e.prompt for e in every}) == len(every)
    assert every[:300] == examples("add", "test", 300)


def test_answers_are_right():
    """Spot checks of each generator's semantics on its own examples."""
    for e in examples("add", "test", 50):
        a, b = e.prompt[4:-1].split("+")
        assert int(e.answer) == int(a) + int(b)
    for e in examples("sort", "test", 50):
        assert e.answer.split() == sorted(e.prompt[5:-1].split())
    for e in examples("rev", "test", 50):
        assert e.answer.split() == e.prompt[4:-1].split()[::-1]
    for e in examples("max", "test", 50):
        assert int(e.answer) == max(map(int, e.prompt[4:-1].split()))
    for e in examples("shift", "test", 50):
        k, *letters = e.prompt[6:-1].split()
        assert [(ord(b) - ord(a)) % 26 for a, b in zip(letters, e.answer.split())] == \
            [int(k)] * len(letters)
    pairs = {"(": ")", "[": "]", "{": "}", "<": ">"}
    for e in examples("brackets", "test", 50):
        stack = []
        for b in (e.prompt[9:-1] + e.answer).split():
            if b in pairs:
                stack.append(b)
            else:
                assert pairs[stack.pop()] == b
        assert not stack and e.answer.strip()


def test_completion_answer():
    assert completion_answer(" 42\nadd 1+1=") == " 42"
    assert completion_answer(" 42") == " 42"
    assert completion_answer("\n 42\n") == ""


def test_score_exact():
    ex = Example("add", "add 12+30=", " 42\n")
    assert score(ex, " 42\n")
    assert score(ex, " 42\nanything after the newline")
    assert score(ex, " 42")  # no newline yet: the whole text is the answer
    for wrong in (" 43\n", " 420\n", "42\n", " 42 \n", " 4\n", " 42.\n", "x 42\n", "\n 42\n",
                  " 42 is it\n", ""):
        assert not score(ex, wrong), wrong


def test_corpus_splits_by_file():
    files = {s: corpus_files(s) for s in SPLITS}
    for s in SPLITS:
        texts = corpus_texts(s)
        assert len(texts) == len(files[s]) > 3
        assert 50_000 < sum(map(len, texts)) < 1_000_000
        assert all(corpus_split_of(f) == s for f in files[s])
        assert all(f.endswith(".py") and "site-packages" not in f for f in files[s])
    assert not set(files["train"]) & set(files["test"])
    assert not set(files["train"]) & set(files["calib"])
    assert not set(files["calib"]) & set(files["test"])
    assert corpus_texts("test") == corpus_texts("test")
    with pytest.raises(ValueError):
        corpus_texts("valid")


def test_calibration_task_names():
    got = load_calibration("add,sort", n=10)
    assert [e.task for e in got] == ["add"] * 10 + ["sort"] * 10
    assert got[:10] == examples("add", "calib", 10)
    assert all(split_of(e.prompt) == "calib" for e in got)
    everything = load_calibration("all", n=3)
    assert [e.task for e in everything] == [t for t in TASKS for _ in range(3)]


def test_calibration_jsonl(tmp_path):
    f = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"q{i}=", "answer": f" {i}\n"} for i in range(5)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = load_calibration(str(f), n=3)
    assert got == [Example("file", f"q{i}=", f" {i}\n") for i in range(3)]
    assert len(load_calibration(str(f))) == 5


def test_calibration_txt(tmp_path):
    f = tmp_path / "text.txt"
    text = "".join(f"line {i} " + "x" * 90 + "\n" for i in range(100))
    f.write_text(text)
    chunks = load_calibration(str(f), n=1000)
    assert "".join(chunks) == text and all(isinstance(c, str) for c in chunks)
    assert len(chunks) > 5
    assert load_calibration(str(f), n=2) == chunks[:2]


@pytest.mark.parametrize("spec, words", [
    ("add,nope", ["unknown calibration task", "'nope'", "add"]),
    ("", ["empty calibration spec"]),
    ("/nonexistent/calib.jsonl", ["not found"]),
    ("/nonexistent/calib.txt", ["not found"]),
])
def test_calibration_bad_spec(spec, words):
    with pytest.raises(UserError) as info:
        load_calibration(spec)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_calibration_bad_jsonl(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a=", "answer": " 1\\n"}\n{"prompt": 3}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected an object"):
        load_calibration(str(f))
    f.write_text("{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: not valid JSON"):
        load_calibration(str(f))
    f.write_text("")
    with pytest.raises(UserError, match="no examples"):
        load_calibration(str(f))
