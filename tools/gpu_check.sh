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
PY
