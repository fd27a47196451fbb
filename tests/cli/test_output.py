"""What a run prints and names: one channel (the job), nothing twice, --quiet silences all but
errors, and `-o DIR/` names files by one rule on both targets, side files after the file."""

import json
import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moecompile.cli", *map(str, args)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("target,flags,label", [
    ("gguf", [], "f16"),
    ("gguf", ["--quant", "q8_0"], "q8_0"),
    ("gguf", ["--quant-map", "MAP"], "mixed"),
    ("onnx", [], "f32"),
    ("onnx", ["--quant", "int8"], "int8"),
    ("onnx", ["--quant-map", "MAP"], "mixed"),
])
def test_a_folder_output_is_named_by_one_rule(tiny_model, tmp_path, target, flags, label):
    folder = tiny_model("olmoe")
    qmap = tmp_path / "map.json"
    qmap.write_text(json.dumps({".": "int8" if target == "onnx" else "q8_0"}))
    flags = [str(qmap) if f == "MAP" else f for f in flags]
    out = tmp_path / "out"
    proc = run_cli(folder, "--target", target, "-o", f"{out}/", "--no-verify", *flags)
    assert proc.returncode == 0, proc.stderr
    name = f"{folder.name}-{label}"
    assert (out / f"{name}.{target}").exists() and (out / f"{name}.report.json").exists()


def test_side_files_are_named_after_the_final_file(tiny_model, tmp_path):
    folder = tiny_model("mixtral", hidden_size=256, intermediate_size=256)
    proc = run_cli(folder, "-o", f"{tmp_path}/", "--quant-map", _map(tmp_path), "--calib", "add",
                   "--calib-n", "2", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    name = f"{folder.name}-mixed"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{name}.gguf", f"{name}.imatrix.dat", f"{name}.report.json", "map.json"])


def _map(tmp_path):
    qmap = tmp_path / "map.json"
    qmap.write_text(json.dumps({"exps": "q4_k", ".": "q8_0"}))
    return qmap


def test_each_line_is_printed_once_and_quiet_prints_only_errors(tiny_model, tmp_path):
    folder = tiny_model("mixtral")
    argv = [folder, "-o", tmp_path / "m.gguf", "--experts", "4", "--prune-method", "frequency",
            "--top-k", "1", "--topk-method", "plain", "--calib", "add", "--calib-n", "2"]
    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    results = [l for l in lines if l.startswith(("pruned to", "top-k", "calibration:", "wrote"))]
    assert len(results) == 4 and len(set(results)) == 4, lines
    quiet = run_cli(*argv, "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    refused = run_cli(*argv[:3], "--experts", "99", "--calib", "add", "--quiet")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "--experts 99" in refused.stderr
