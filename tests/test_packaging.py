"""A non-editable install works as well as the editable one: the wheel holds passes/ and
exporters/ as moecompile.passes and moecompile.exporters (never as top-level packages), and
the compiler imports and runs from the wheel alone."""

import subprocess
import sys
import zipfile

import pytest

from moecompile.testing.models import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(REPO)], check=True, capture_output=True)
    (path,) = out.glob("moecompile-*.whl")
    return path


def test_wheel_maps_passes_and_exporters_into_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"moecompile"}
    for module in ("moecompile/passes/base.py", "moecompile/exporters/target.py",
                   "moecompile/exporters/gguf/target.py", "moecompile/exporters/onnx/target.py",
                   "moecompile/analysis/eep.py", "moecompile/testing/models.py"):
        assert module in names, module


def test_the_installed_wheel_compiles_a_model(wheel, tiny_model, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = tmp_path / "m.gguf"
    code = ("import moecompile, sys; assert moecompile.__file__.startswith(sys.argv[1]), "
            "moecompile.__file__; from moecompile.cli import main; "
            "sys.exit(main([sys.argv[2], '-o', sys.argv[3], '--quiet']))")
    proc = subprocess.run([sys.executable, "-c", code, str(site), str(tiny_model("olmoe")),
                           str(out)], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
