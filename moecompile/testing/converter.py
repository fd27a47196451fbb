"""llama.cpp's own `convert_hf_to_gguf.py`, fetched for benchmarks and tests: a reference to
compare with and a third-party maker of GGUF files for `moecompile verify` to judge. Never a
dependency, and none of its code is kept in this repository: it comes from the sdist of the
installed llama-cpp-python (the same llama.cpp revision moecompile verifies with), extracted
into a work folder at run time.

The converter refuses BPE tokenizers whose pre-tokenizer hash it does not know, and the test
and benchmark tokenizers are trained locally, so it runs through a small wrapper that answers
"gpt-2" (right for those byte-level tokenizers) and otherwise calls its main() unchanged.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from .checkpoints import log


def convert(model: Path, out: Path, outtype: str, work: Path) -> subprocess.CompletedProcess:
    """Run llama.cpp's converter on `model` (outtype f32, f16, bf16, q8_0) into `out`."""
    wrapper = ensure_reference(work)
    return subprocess.run([sys.executable, str(wrapper), str(model), "--outfile", str(out),
                           "--outtype", outtype], capture_output=True, text=True,
                          env={"PYTHONPATH": str(wrapper.parent / "gguf-py"), "PATH": "/usr/bin:/bin"})


_WRAPPER = '''"""Written by moecompile.testing.converter: llama.cpp's convert_hf_to_gguf.py with the BPE
pre-tokenizer detection patched to "gpt-2", because the benchmark's tokenizer is trained locally
and its hash is unknown to the converter. Everything else is the converter as shipped."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gguf  # noqa: E402

if not Path(gguf.__file__).resolve().is_relative_to(HERE):
    sys.exit(f"run_convert.py: expected the vendored gguf-py, got {gguf.__file__}")
import convert_hf_to_gguf  # noqa: E402

try:
    from conversion.base import TextModel  # llama.cpp after the split into conversion/
except ImportError:
    TextModel = getattr(convert_hf_to_gguf, "TextModel", None) or convert_hf_to_gguf.Model
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
convert_hf_to_gguf.main()
'''

_VENDOR = "vendor/llama.cpp/"
_WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def ensure_reference(work: Path) -> Path:
    """llama.cpp's converter from the installed llama-cpp-python's sdist; returns the wrapper.

    The sdist is the only place the converter ships with the exact llama.cpp revision we run
    against; extraction is cached per version (marker `.version`)."""
    version = importlib.metadata.version("llama-cpp-python")
    dest = work / "llama.cpp-convert"
    marker = dest / ".version"
    if not (marker.exists() and marker.read_text() == version):
        sdist = _download_sdist(work / "sdist", version)
        if dest.exists():
            shutil.rmtree(dest)
        _extract_converter(sdist, dest)
        marker.write_text(version)
    wrapper = dest / "run_convert.py"
    wrapper.write_text(_WRAPPER)
    return wrapper


def _download_sdist(folder: Path, version: str) -> Path:
    found = sorted(folder.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        log(f"downloading the llama-cpp-python {version} sdist (76 MB) for convert_hf_to_gguf.py")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", f"llama-cpp-python=={version}", "-d", str(folder)], check=True,
                       stdout=subprocess.DEVNULL)
        found = sorted(folder.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download left no llama_cpp_python-{version}.tar.gz in {folder}")
    return found[0]


def _extract_converter(sdist: Path, dest: Path) -> None:
    """Extract only the converter, its model package and its gguf-py (tests excluded)."""
    log(f"extracting convert_hf_to_gguf.py from {sdist.name} into {dest}")
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            top, _, rest = m.name.partition("/")
            rel = rest[len(_VENDOR):] if rest.startswith(_VENDOR) else None
            if rel and rel.startswith(_WANTED) and "/tests/" not in rel and (m.isfile() or m.isdir()):
                m.name = rel
                members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise RuntimeError(f"{sdist} has no {_VENDOR}convert_hf_to_gguf.py")
        tar.extractall(dest, members=members, filter="data")
