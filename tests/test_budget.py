"""--budget: sizes, the memory model against llama.cpp's own numbers, and --quant auto."""

import json
import re
import subprocess
import sys

import pytest

from moecompile import frontend
from moecompile.budget import compute_bytes, kv_cache_bytes, parse_size
from moecompile.cli import main
from moecompile.errors import UserError
from moecompile.exporters import gguf_quant as gq


@pytest.mark.parametrize("text,want", [("24GB", 24 * 10**9), ("8GiB", 8 * 2**30),
                                       ("512MB", 512 * 10**6), ("1.5G", int(1.5 * 2**30)),
                                       ("1048576", 2**20), ("64 mib", 64 * 2**20)])
def test_sizes(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["24XB", "-1GB", "0", "GB", "1e9", ""])
def test_malformed_sizes_exit_2(tiny_model, tmp_path, capsys, text):
    with pytest.raises(UserError):
        parse_size(text)
    folder = tiny_model("mixtral")
    capsys.readouterr()
    rc = main([str(folder), "-o", str(tmp_path / "x.gguf"), f"--budget={text}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "--budget" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


_PROBE = """
import sys
from llama_cpp import Llama
Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=1, verbose=True)
"""


@pytest.mark.parametrize("ctx", [128, 256])
def test_kv_and_compute_predictions_match_llama_cpp(tiny_model, tmp_path, ctx):
    folder = tiny_model("mixtral", hidden_size=256, intermediate_size=256)
    out = tmp_path / "m.gguf"
    assert main([str(folder), "-o", str(out), "--quant", "q4_k", "--no-verify", "--quiet"]) == 0
    log = subprocess.run([sys.executable, "-c", _PROBE, str(out), str(ctx)], capture_output=True,
                         text=True).stderr
    mib = lambda pattern: float(re.search(pattern + r"\s*=\s*([0-9.]+) MiB", log).group(1))
    model = frontend.load(folder)
    assert kv_cache_bytes(model, ctx) / 2**20 == pytest.approx(mib(r"CPU KV buffer size"), abs=0.01)
    assert compute_bytes(model, ctx) / 2**20 == pytest.approx(
        mib(r"CPU compute buffer size"), rel=0.02)


def test_quant_auto_fits_the_budget_and_reports_exact_weights(tiny_model, tmp_path):
    folder = tiny_model("mixtral", hidden_size=256, intermediate_size=256)
    sizes = {}
    for budget in ("3MiB", "6MiB"):
        out = tmp_path / f"auto-{budget}.gguf"
        rc = main([str(folder), "-o", str(out), "--quant", "auto", "--budget", budget,
                   "--calib", "add,rev", "--calib-n", "3", "--ctx", "128", "--no-verify",
                   "--quiet"])
        assert rc == 0
        report = json.loads(out.with_suffix(".report.json").read_text())
        mem = report["memory"]
        assert mem["total_bytes"] <= parse_size(budget)
        assert mem["weights_bytes"] == sum(b for *_, b in gq.read_tensors(out))
        assert mem["total_bytes"] == mem["weights_bytes"] + mem["kv_cache_bytes"] + mem["compute_bytes"]
        assert out.with_suffix(".imatrix.dat").exists()
        sizes[budget] = mem["weights_bytes"]
        groups = report["quant"]["groups"]
        assert set(groups.values()) <= set(gq.QUANTIZED)
    assert sizes["3MiB"] < sizes["6MiB"]


def test_budget_below_any_configuration_names_the_smallest(tiny_model, tmp_path, capsys):
    folder = tiny_model("mixtral", hidden_size=256, intermediate_size=256)
    rc = main([str(folder), "-o", str(tmp_path / "x.gguf"), "--quant", "auto", "--budget", "1MB",
               "--calib", "add", "--calib-n", "2", "--ctx", "128", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "smallest reachable size" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.gguf"))
