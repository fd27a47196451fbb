"""tools/eval.py's arguments and what it does without lm-eval; paired intervals; suite files."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest

from moecompile.evaluation.paired import mean_ci, paired_difference
from moecompile.evaluation.suite_tasks import near_misses, suite_documents, write_suite_task

from moecompile.testing.eval_docs import ROOT


def test_lm_eval_is_optional_and_its_absence_is_one_line(qwen3, monkeypatch, capsys, eval_main):
    code = ("import sys, moecompile.evaluation, moecompile.evaluation.compare, "
            "moecompile.evaluation.benchmarks, moecompile.evaluation.report; "
            "sys.exit(int('lm_eval' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets uninstalled
    assert eval_main([str(qwen3), "--lm-eval", "arc_easy", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "needs lm-evaluation-harness" in err and "pip install" in err


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "--limit"),
    (["--limit", "2.5"], "--limit"),
    (["--ctx", "2"], "--ctx must be at least 4"),
    (["--text", "no/such/file.txt"], "no such file"),
    (["--tasks", "no/such/tasks.jsonl"], "no such file"),
    (["--tasks", "add,juggling"], "unknown task(s) juggling"),
    (["--ppl", "--text", "README.md"], "give one"),
    (["--max-memory", "lots"], "--max-memory 'lots'"),
])
def test_bad_arguments_exit_2_with_one_line(qwen3, capsys, eval_main, args, message):
    assert eval_main([str(qwen3), *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eval: error: ") and message in err and len(err.splitlines()) == 1


def test_bad_model_path_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"),
                           str(tmp_path / "model.bin"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "expected a Hugging Face folder, a .gguf or an .onnx file" in proc.stderr


def test_paired_difference_is_the_mean_of_per_document_differences():
    a = [1, 1, 0, 1, 0, 1, 1, 0]
    b = [1, 0, 0, 1, 1, 0, 0, 0]
    d = [x - y for x, y in zip(a, b)]
    r = paired_difference(a, b)
    half = 1.959964 * statistics.stdev(d) / math.sqrt(len(d))
    assert r["diff"] == pytest.approx(statistics.mean(d))
    assert (r["low"], r["high"]) == pytest.approx((r["diff"] - half, r["diff"] + half))
    assert (r["a_only"], r["b_only"], r["n"]) == (3, 1, 8)
    same = paired_difference(a, a)
    assert same["diff"] == same["low"] == same["high"] == 0.0
    p = mean_ci(a)
    assert p["stderr"] == pytest.approx(statistics.stdev(a) / math.sqrt(len(a)))
    with pytest.raises(ValueError):
        paired_difference(a, b[:-1])


def test_suite_task_files(tmp_path):
    docs = suite_documents(n=5)
    assert len(docs) == 30 and all(len(d["choices"]) == 4 for d in docs)
    for d in docs:
        assert len(set(d["choices"])) == 4 and 0 <= d["answer"] < 4
    assert near_misses("add", "add 12+34=", "46") == near_misses("add", "add 12+34=", "46")
    assert "46" not in near_misses("add", "add 12+34=", "46")
    yaml = write_suite_task(tmp_path, n=2)
    lines = yaml.with_suffix(".jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["choices"]
    assert str(yaml.with_suffix(".jsonl")) in yaml.read_text()
