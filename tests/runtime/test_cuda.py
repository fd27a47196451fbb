"""The CUDA path (skipped without a GPU; tools/gpu_check.sh runs these on a CUDA machine): the
reference and streaming executors, fitness, the layer-local sensitivity and the streaming
reconstruction give the numbers the CPU gives, within float tolerance."""

import pytest
import torch

from moecompile import frontend
from moecompile.analysis.calibration import build_calib
from moecompile.analysis.fitness import FitnessEvaluator
from moecompile.runtime import ReferenceExecutor
from moecompile.runtime.streaming import StreamingExecutor
from moecompile.testing.models import ARCHS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("arch", ARCHS)
def test_executors_on_cuda_match_the_cpu(tiny_model, arch):
    model = frontend.load(tiny_model(arch))
    calib = build_calib(model, "add,rev", 3)
    real = calib.mask.bool()
    cpu = ReferenceExecutor(model, "cpu").logits(calib.ids, calib.mask)[real]
    for executor in (ReferenceExecutor, StreamingExecutor):
        gpu = executor(model, "cuda").logits(calib.ids, calib.mask)[real].cpu()
        assert torch.allclose(gpu, cpu, atol=1e-3, rtol=1e-3), (executor, (gpu - cpu).abs().max())


def test_fitness_on_cuda_matches_the_cpu(tiny_model):
    model = frontend.load(tiny_model("olmoe"))
    calib = build_calib(model, "add,sort", 4)
    assert FitnessEvaluator(model, calib, "cuda").fitness({}) == pytest.approx(
        FitnessEvaluator(model, calib, "cpu").fitness({}), abs=1e-3)


def test_compile_with_the_reference_on_cuda(tiny_model, tmp_path):
    from moecompile.cli import main

    out = tmp_path / "m.gguf"
    assert main([str(tiny_model("qwen3_moe")), "-o", str(out), "--quant", "q8_0",
                 "--device", "cuda", "--quiet"]) == 0


def test_streaming_reconstruction_on_cuda_matches_the_cpu(tiny_model):
    """NAEE's subset errors at real size (every expert on the layer's tokens, Gram matrices)
    computed on the GPU: the CPU's errors and choices."""
    from moecompile.analysis.baselines import ReconstructionObserver

    model = frontend.load(tiny_model("olmoe"))
    calib = build_calib(model, "add,sort", 4)
    found = {}
    for device in ("cpu", "cuda"):
        observer = ReconstructionObserver(model, calib, 2, seed=0)
        StreamingExecutor(model, device, observer=observer).run(calib.ids, calib.mask, None)
        found[device] = observer
    for layer, want in found["cpu"].squares.items():
        got = found["cuda"].squares[layer]
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-6 * float(want.max())), layer
        assert found["cuda"].best(layer) == found["cpu"].best(layer)


def test_a_generation_on_cuda_scores_what_the_cpu_does(tiny_model):
    """A search's generation scored in one pass (analysis/population.py) on the GPU: the CPU's
    fitness values, one-hot and merging candidates alike."""
    import numpy as np

    from moecompile.analysis.expert_plan import LayerPlan, keep_plan, moe_layers
    from moecompile.analysis.population import PopulationFitness

    model = frontend.load(tiny_model("qwen3_moe"))
    calib = build_calib(model, "add,sort", 4)
    rng = np.random.default_rng(0)
    n = model.blocks[moe_layers(model)[0]].ffn.n_experts
    candidates = []
    for c in range(4):
        plans = {}
        for i in moe_layers(model):
            plan = keep_plan(sorted(rng.choice(n, n // 2, replace=False).tolist()), n)
            if c % 2:
                merge = plan.merge + 0.1 * rng.random(plan.merge.shape)
                merge /= merge.sum(1, keepdims=True)
                plan = LayerPlan(merge, merge.copy())
            plans[i] = plan
        candidates.append(plans)
    got = {device: PopulationFitness(model, calib, "logits", None, device).score(candidates)
           for device in ("cpu", "cuda")}
    assert got["cuda"] == pytest.approx(got["cpu"], abs=1e-3)
