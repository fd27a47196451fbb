"""`moecompile MODEL --budget SIZE`, as the README promises it: the most faithful file that fits
SIZE, with no other flag — lossless when it fits, else types chosen by measured sensitivity on
a default calibration set — or a refusal naming the smallest reachable size; `--plan` says
what would be written and writes nothing."""

import json
import subprocess
import sys

import pytest

from moecompile import frontend
from moecompile.exporters.gguf.memory import context_bytes
from moecompile.testing.models import BUNDLED

MIB = 2**20
LOSSLESS = 34.46  # MiB: the bundled model's f16 file + llama.cpp's memory at --ctx 512
SMALLEST = 25.32  # MiB: every group at its smallest type, same context

needs_bundled = pytest.mark.skipif(not (BUNDLED / "config.json").exists(),
                                   reason="bundled model missing")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moecompile.cli", *map(str, args)],
                          capture_output=True, text=True)


@needs_bundled
def test_sizes_the_test_relies_on():
    model = frontend.load(BUNDLED)
    assert context_bytes(model, 512) / MIB == pytest.approx(SMALLEST - 1.82, abs=0.01)


@needs_bundled
@pytest.mark.parametrize("budget_mib,label", [(LOSSLESS + 0.1, "f16"), (30.0, "mixed"),
                                              (SMALLEST + 0.3, "mixed")])
def test_budget_alone_writes_the_most_faithful_file_that_fits(tmp_path, budget_mib, label):
    budget = int(budget_mib * MIB)
    faster = ["--calib-n", "4"] if budget_mib < 30 else []  # 30: the literal command
    proc = run_cli(BUNDLED, "--budget", budget, "-o", f"{tmp_path}/", *faster)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / f"moe-tiny-{label}.report.json").read_text())
    assert report["memory"]["total_bytes"] <= budget and report["verification"]["passed"]
    assert f"of --budget {budget / MIB:.2f} MiB" in proc.stdout
    if label == "f16":
        assert "the lossless f16 file fits" in proc.stdout and "calibration" not in proc.stdout
    else:
        # the bundled model's folder names its default calibration: the task suite's split
        assert "calibration: all" in proc.stdout and "moecompile.json" in proc.stdout
        assert report["calibration"]["spec"] == "all" and not report["calibration"]["given"]
        assert report["calibration"]["examples"] == (192 if not faster else 24)
        assert "predicted KL" in proc.stdout and "  ffn_down_exps:" in proc.stdout


@needs_bundled
def test_budget_below_the_smallest_reachable_size_is_refused_before_measuring(tmp_path):
    proc = run_cli(BUNDLED, "--budget", int((SMALLEST - 0.1) * MIB), "-o", f"{tmp_path}/")
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"smallest reachable size {SMALLEST:.2f} MiB" in proc.stderr
    assert "--experts" in proc.stderr  # fewer experts would fit
    assert not list(tmp_path.iterdir())


@needs_bundled
def test_plan_prints_the_choice_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    proc = run_cli(BUNDLED, "--budget", int(30 * MIB), "--calib", "add", "--calib-n", "2",
                   "--plan", "-o", f"{out}/")
    assert proc.returncode == 0, proc.stderr
    assert "nothing written (--plan)" in proc.stdout
    assert "llama-server -m moe-tiny-mixed.gguf -c 512" in proc.stdout
    assert "memory: weights" in proc.stdout and not out.exists()
    assert not list(tmp_path.iterdir())


@needs_bundled
def test_onnx_budget_alone_chooses_per_expert(tmp_path):
    proc = run_cli(BUNDLED, "--target", "onnx", "--budget", int(9 * MIB), "--calib-n", "4",
                   "-o", f"{tmp_path}/")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "moe-tiny-mixed.report.json").read_text())
    assert report["memory"]["total_bytes"] <= 9 * MIB and report["verification"]["passed"]
    assert "choosing types per expert" in proc.stdout and "  experts:" in proc.stdout


def test_flags_that_need_data_take_the_built_in_mix(tiny_model, tmp_path):
    out = tmp_path / "p.gguf"
    proc = run_cli(tiny_model("mixtral"), "--experts", "4", "--prune-method", "frequency",
                   "--calib-n", "3", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "calibration: default (3 examples" in proc.stdout
    assert "the built-in mix of prose, code and numbers" in proc.stdout
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["calibration"]["spec"] == "default" and not report["calibration"]["given"]
    assert report["passes"][0]["fitness_kind"] == "neg_kl"
