"""Decoding an exported ONNX model one token at a time: resident memory grows with the cache,
not with the number of steps. ONNX Runtime keeps a memory pattern per input shape unless told
not to, and a decoder's input shapes change every step: measured on the bundled model
(portable int4, steps 128 -> 511) 10.6 MiB of growth with patterns (onnxruntime-genai: 14.4)
against 2.3 (1.9) without, for a cache that grows by 0.56 MiB."""

import subprocess
import sys

import pytest

from moecompile.cli import main
from moecompile.testing.models import BUNDLED

FROM, TO = 128, 511

_ORT = """
import sys, numpy as np
from moecompile.runtime.onnx_runner import OnnxDecoder
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
dec = OnnxDecoder(sys.argv[1], "cpu", threads=1)
ids = np.random.default_rng(0).integers(1, dec.vocab, {to})
cache, marks = dec.empty_cache(1), {{}}
for n in range({to}):
    _, cache = dec.step(ids[None, n:n + 1], np.ones((1, n + 1), np.int64), cache)
    marks[n + 1] = rss()
print(marks[{to}] - marks[{start}])
""".format(to=TO, start=FROM)

_GENAI = """
import sys
import onnxruntime_genai as og
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
model = og.Model(sys.argv[1])
params = og.GeneratorParams(model)
params.set_search_options(max_length={to}, min_length={to})
gen = og.Generator(model, params)
gen.append_tokens([[1, 2, 3]])
marks, n = {{}}, 3
while not gen.is_done():
    gen.generate_next_token()
    n += 1
    marks[n] = rss()
print(marks[{to}] - marks[{start}])
""".format(to=TO, start=FROM)


@pytest.fixture(scope="module")
def portable_int4(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-memory")
    assert main([str(BUNDLED), "--target", "onnx", "--quant", "int4", "--onnx-moe", "portable",
                 "-o", f"{out}/", "--no-verify", "--quiet"]) == 0
    return out


def _growth(script: str, path) -> int:
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          text=True, check=True)
    return int(proc.stdout.split()[-1])


def _cache_growth() -> int:
    """float32 K and V of every layer for the tokens decoded between the two marks."""
    from moecompile import frontend

    model = frontend.load(BUNDLED)
    per_token = sum(2 * 4 * b.attn.n_kv_heads * b.attn.head_dim for b in model.blocks)
    return per_token * (TO - FROM)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("runner", ["onnxruntime", "onnxruntime-genai"])
def test_decoding_grows_with_the_cache_not_the_steps(portable_int4, runner):
    if runner == "onnxruntime-genai":
        pytest.importorskip("onnxruntime_genai")
        growth = _growth(_GENAI, portable_int4)
    else:
        growth = _growth(_ORT, next(portable_int4.glob("*.onnx")))
    # past and present caches, the step's copies of them and the allocator's slack: measured
    # 2.3 MiB (genai 1.9) for 0.56 MiB of cache; with memory patterns 10.6 (14.4)
    assert growth <= 6 * _cache_growth() + 2**19, growth / 2**20
