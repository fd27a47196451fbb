"""tools/eval.py: accuracy, perplexity and divergence through the real runtimes."""

import json
import subprocess
import sys

import pytest

from moecompile.cli import main as compile_main
from moecompile.evaluation import evaluate
from moecompile.testing.models import REPO as ROOT

BUNDLED = ROOT / "models" / "moe-tiny"


def test_model_against_itself_has_zero_kl(tiny_model):
    folder = str(tiny_model("olmoe"))
    result = evaluate(folder, base=folder, tasks=["add"], n=4, ppl=True, progress=False)
    assert result["kl"] == pytest.approx(0.0, abs=1e-9)
    assert result["top1_agreement"] == 1.0
    assert result["tasks"]["add"]["n"] == 4 and result["perplexity"] > 1.0


def test_f32_gguf_against_its_source_is_near_zero_kl(tiny_model, tmp_path):
    folder = tiny_model("qwen3_moe")
    out = tmp_path / "m.gguf"
    assert compile_main([str(folder), "-o", str(out), "--dtype", "f32", "--quiet"]) == 0
    result = evaluate(str(out), base=str(folder), tasks=["sort"], n=4, progress=False)
    assert result["kl"] < 1e-6 and result["top1_agreement"] == 1.0


def test_cli_json_and_bad_input(tiny_model, tmp_path):
    folder = tiny_model("mixtral")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), str(folder),
                           "--tasks", "add,rev", "--n", "3", "--json", str(out), "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == {"add", "rev"} and data["tasks"]["add"]["n"] == 3
    assert "| add |" in proc.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), str(folder),
                          "--tasks", "add,juggling"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown task(s) juggling" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_ir_backend_matches_transformers(tiny_model):
    """An in-memory (e.g. just pruned) model evaluates like its checkpoint in transformers."""
    from moecompile import frontend
    from moecompile.evaluation.backends import HFBackend, IRBackend

    folder = tiny_model("qwen2_moe")
    hf, mem = HFBackend(folder), IRBackend(frontend.load(folder))
    prompts = [hf.encode(p) for p in ("add 12+34=", "rev a b c=", "sort 3 1 2=")]
    assert mem.greedy(prompts, 6) == hf.greedy(prompts, 6)
    for a, b in zip(mem.logits(prompts), hf.logits(prompts)):
        assert abs(a - b).max() < 1e-4
