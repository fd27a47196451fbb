"""`--ray` on the command line: the same file as without it, one line and exit 2 for what
cannot work, and Ctrl-C leaves neither workers nor files behind."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moecompile.cli import main
from moecompile.testing.models import BUNDLED

EEP = ["--experts", "4", "--calib", "add", "--calib-n", "8", "--search-budget", "48"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "moecompile.cli", *map(str, args)],
                          capture_output=True, text=True, env=env)


def refused(proc_or_code, capsys=None):
    """The one error line of a refused run."""
    if capsys is not None:
        assert proc_or_code == 2
        err = capsys.readouterr().err
    else:
        assert proc_or_code.returncode == 2, proc_or_code.stderr
        err = proc_or_code.stderr
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moecompile: error:"), err
    return lines[0]


@pytest.mark.parametrize("address", ["local:0", "local:two", "local:", "nowhere",
                                     "host:0", "host:70000", ":6379"])
def test_malformed_addresses_are_refused_before_the_model_is_read(tmp_path, capsys, address):
    code = main([str(tmp_path / "no-such-model"), *EEP, "--ray", address,
                 "-o", str(tmp_path / "x.gguf")])
    assert "--ray" in refused(code, capsys)
    assert list(tmp_path.iterdir()) == []


def test_ray_without_calibration_work_is_refused(tmp_path, capsys):
    code = main([str(BUNDLED), "--ray", "local:2", "-o", str(tmp_path / "x.gguf")])
    assert "--ray only applies" in refused(code, capsys)


def test_a_head_that_does_not_answer_is_one_line(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    code = main([str(BUNDLED), *EEP, "--ray", f"127.0.0.1:{port}", "-o", str(tmp_path / "x.gguf")])
    assert "no Ray head answers" in refused(code, capsys)
    assert time.monotonic() - t0 < 30
    assert list(tmp_path.iterdir()) == []


def test_auto_without_a_running_cluster_is_one_line(tmp_path):
    pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    line = refused(run_cli(BUNDLED, *EEP, "--ray", "auto", "-o", tmp_path / "x.gguf", env=env))
    assert "cannot join a Ray cluster" in line
    assert list(tmp_path.iterdir()) == []


_NO_RAY = """
import sys
sys.modules["ray"] = None  # importing ray fails, as where it is not installed
from moecompile.cli import main
out = sys.argv[1]
print(main(["{model}", *{eep}, "--ray", "local:2", "-o", out + "/a.gguf"]))
print(main(["{model}", *{eep}, "--no-verify", "--quiet", "-o", out + "/b.gguf"]))
"""


def test_without_ray_installed_the_core_runs_and_ray_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _NO_RAY.format(model=BUNDLED, eep=EEP),
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.stdout.split() == ["2", "0"], proc.stderr
    assert "pip install 'moecompile[distributed]'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gguf", "b.report.json"]


def gguf_contents(path: Path) -> dict:
    """Every tensor's bytes and every metadata value; wall-clock seconds taken out of the
    pass history (tools/record_outputs.py's VOLATILE_KEYS)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for field in reader.fields.values():
        value = field.contents()
        if field.name == "moecompile.history":
            value = [{k: v for k, v in entry.items() if k != "seconds"}
                     for entry in json.loads(value)]
        meta[field.name] = value
    tensors = {t.name: (t.tensor_type, t.data.tobytes()) for t in reader.tensors}
    return {"meta": meta, "tensors": tensors}


def test_eep_with_ray_writes_the_same_file_as_without(tmp_path):
    pytest.importorskip("ray")
    assert main([str(BUNDLED), *EEP, "--quiet", "-o", str(tmp_path / "serial.gguf")]) == 0
    proc = run_cli(BUNDLED, *EEP, "--ray", "local:2", "-o", tmp_path / "ray.gguf")
    assert proc.returncode == 0, proc.stderr
    assert "ray: 2 workers on a local cluster" in proc.stdout
    serial, ray = gguf_contents(tmp_path / "serial.gguf"), gguf_contents(tmp_path / "ray.gguf")
    assert ray["tensors"] == serial["tensors"]
    assert ray["meta"] == serial["meta"]
    history = serial["meta"]["moecompile.history"][0]
    assert history["evaluations"] == 48 and history["search_batch"] == 8
    report = json.loads((tmp_path / "ray.report.json").read_text())
    assert report["engine"]["engine"] == "ray" and report["engine"]["workers"] == 2
    assert report["engine"]["candidates"] >= 48 + 2  # the search, the unpruned and the answer


def test_quant_auto_with_ray_writes_the_same_file_as_without(tmp_path):
    pytest.importorskip("ray")
    args = ["--quant", "auto", "--budget", "17MB", "--calib", "all", "--calib-n", "2",
            "--ctx", "256", "--no-verify"]
    assert main([str(BUNDLED), *args, "--quiet", "-o", str(tmp_path / "serial.gguf")]) == 0
    proc = run_cli(BUNDLED, *args, "--ray", "local:2", "-o", tmp_path / "ray.gguf")
    assert proc.returncode == 0, proc.stderr
    serial, ray = gguf_contents(tmp_path / "serial.gguf"), gguf_contents(tmp_path / "ray.gguf")
    assert ray["tensors"] == serial["tensors"] and ray["meta"] == serial["meta"]
    report = json.loads((tmp_path / "ray.report.json").read_text())
    assert report["engine"]["engine"] == "ray" and report["engine"]["tasks"] >= 2
    mine = json.loads((tmp_path / "serial.report.json").read_text())
    assert report["quant"]["sensitivity"] == mine["quant"]["sensitivity"]


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_ctrl_c_stops_the_workers_and_leaves_nothing(tmp_path):
    pytest.importorskip("ray")
    import psutil

    before = set(Path("/tmp").glob("moecompile-ray-*"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "moecompile.cli", str(BUNDLED), "--experts", "4", "--calib",
         "all", "--search-budget", "100000", "--ray", "local:2", "-o", str(tmp_path / "x.gguf")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:  # the workers are up, the search is about to start
            if line.startswith("ray: "):
                break
        time.sleep(8)  # well into the search
        assert proc.poll() is None
        ours = set(Path("/tmp").glob("moecompile-ray-*")) - before
        assert len(ours) == 1
        children = _descendants(proc.pid)
        assert len(children) >= 3  # Ray's processes and the two workers
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted; nothing was written" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    assert not any(p.exists() for p in ours)
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [p.info if hasattr(p, "info") else p for p in alive]
