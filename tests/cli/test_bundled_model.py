"""The bundled trained model: what tools/eval.py measures on it through both runtimes."""

import shutil

import pytest
from safetensors.torch import load_file, save_file

from moecompile.cli import main as compile_main
from moecompile.evaluation import evaluate
from moecompile.tasks import TASKS
from moecompile.testing.models import BUNDLED

N = 40


@pytest.fixture(scope="module")
def hf_scores():
    return evaluate(str(BUNDLED), tasks=list(TASKS), n=N, progress=False)["tasks"]


def test_bundled_model_solves_every_task(hf_scores):
    for task, r in hf_scores.items():
        assert r["accuracy"] >= 0.85, (task, r)


def test_zeroed_lm_head_scores_about_zero(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(BUNDLED, broken)
    weights = load_file(broken / "model.safetensors")
    weights["lm_head.weight"].zero_()
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    scores = evaluate(str(broken), tasks=list(TASKS), n=N, progress=False)["tasks"]
    assert all(r["accuracy"] <= 0.05 for r in scores.values()), scores


def test_f32_gguf_scores_like_the_hf_folder(hf_scores, tmp_path):
    out = tmp_path / "bundled.gguf"
    assert compile_main([str(BUNDLED), "-o", str(out), "--dtype", "f32", "--quiet"]) == 0
    gguf_scores = evaluate(str(out), tasks=list(TASKS), n=N, progress=False)["tasks"]
    for task in TASKS:
        assert gguf_scores[task]["n"] == hf_scores[task]["n"] == N
        assert abs(gguf_scores[task]["accuracy"] - hf_scores[task]["accuracy"]) * N <= 1, task
