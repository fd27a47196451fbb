#!/usr/bin/env bash
# The CUDA path's check, for a machine with an NVIDIA GPU (CI has none): installs the project
# with a CUDA build of torch into .venv-gpu, runs the GPU tests and a small streaming benchmark.
# About 5-8 minutes on one H100/H200 (most of it pip). Usage: bash tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126 \
    || .venv-gpu/bin/pip install -q torch==2.13.0
.venv-gpu/bin/pip install -q -e '.[test]'
.venv-gpu/bin/python -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print(torch.cuda.get_device_name())"
.venv-gpu/bin/python -m pytest -q -m gpu tests/runtime/test_cuda.py
# a small benchmark: one streaming pass of a 4-layer OLMoE-shaped checkpoint, CPU against CUDA
.venv-gpu/bin/python -m moecompile.testing.synthetic olmoe-1b-7b .bench/gpu-olmoe-4l --layers 4 > /dev/null
.venv-gpu/bin/python - <<'PY'
import time, torch
from moecompile import frontend
from moecompile.analysis.calibration import build_calib
from moecompile.runtime.streaming import StreamingExecutor
model = frontend.load(".bench/gpu-olmoe-4l")
calib = build_calib(model, "default", 16)
for device in ("cuda", "cpu"):
    t = time.perf_counter()
    StreamingExecutor(model, device).run(calib.ids, calib.mask, None)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"streaming pass, {calib.n_tokens} tokens, 4 OLMoE layers, {device}: "
          f"{time.perf_counter() - t:.1f} s")
# a search's candidates on the GPU: a pass per candidate against a generation per pass
import sys
sys.path.insert(0, "tests/analysis")
from test_population import candidates
from moecompile.analysis.expert_plan import apply_plans
from moecompile.analysis.fitness import StreamingFitness
from moecompile.analysis.population import PopulationFitness
group = candidates(model, 0, 8)
t = time.perf_counter()
for plans in group:
    fitness = StreamingFitness(calib)
    StreamingExecutor(apply_plans(model, plans, "logits"), "cuda").run(calib.ids, calib.mask,
                                                                        fitness.consume)
torch.cuda.synchronize()
each = (time.perf_counter() - t) / len(group)
t = time.perf_counter()
PopulationFitness(model, calib, "logits", None, "cuda").score(group)
torch.cuda.synchronize()
generation = (time.perf_counter() - t) / len(group)
print(f"cuda, 8 candidates: a pass each {each:.2f} s a candidate, a generation per pass "
      f"{generation:.2f} s a candidate ({each / generation:.2f}x)")
PY
