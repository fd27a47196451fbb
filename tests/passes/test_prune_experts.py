"""Expert pruning: EEP and the baselines, on every architecture, through llama.cpp."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompile import frontend, ir
from moecompile.analysis.baselines import choose, collect_layer_io
from moecompile.analysis.calibration import build_calib
from moecompile.analysis.eep import EEPConfig
from moecompile.analysis.expert_plan import LayerPlan, apply_plans, keep_plan, moe_layers
from moecompile.analysis.fitness import FitnessEvaluator
from moecompile.cli import main
from moecompile.exporters.target import TypeRequest
from moecompile.job import compile_model
from moecompile.passes.base import apply
from moecompile.passes.prune_experts import PruneExperts
from moecompile.runtime import ReferenceExecutor
from moecompile.testing.models import ARCHS, BUNDLED

F32 = TypeRequest(dtype="f32")


def prune_experts(model, n, method, calib, calib_n=32, config=None, progress=False):
    """The pass through the manager, as the job runs it: (model, report)."""
    return apply(PruneExperts(n, method, config), model, calib, calib_n, progress=progress)


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_export_verifies_for_every_arch(tiny_model, tmp_path, calib_of, arch):
    model = frontend.load(tiny_model(arch))
    pruned, report = prune_experts(model, 2, "frequency", calib_of(model), progress=False)
    assert all(b.ffn.n_experts == 2 and b.ffn.router.weight.shape[0] == 2 for b in pruned.blocks)
    assert pruned.history[-1]["pass"] == "prune_experts"
    result = compile_model(pruned, tmp_path / "p.gguf", "gguf", F32, progress=False)
    assert result.passed, result.verification.summary()
    assert result.report["passes"][0]["layers"] == report["layers"]


def test_merged_experts_export_and_match_reference(tiny_model, tmp_path):
    """Non-one-hot merge weights (EEP phase 2) become ordinary experts llama.cpp runs."""
    model = frontend.load(tiny_model("mixtral"))
    rng = np.random.default_rng(0)
    plans = {layer: LayerPlan(np.eye(8)[[1, 4, 6]] + rng.normal(0, 0.1, (3, 8)),
                              np.eye(8)[[1, 4, 6]]) for layer in moe_layers(model)}
    merged = ir.verify(apply_plans(model, plans))
    assert merged.blocks[0].ffn.experts[0].gate.dtype == "f32"
    result = compile_model(merged, tmp_path / "m.gguf", "gguf", F32, progress=False)
    assert result.passed and result.verification.top1_agreement == 1.0


@pytest.mark.parametrize("exact", [False, True])
def test_fast_fitness_path_equals_executor_on_the_applied_model(tiny_model, calib_of, exact):
    model = frontend.load(tiny_model("qwen2_moe"))  # shared expert, no top-k renorm
    calib = calib_of(model)
    rng = np.random.default_rng(1)
    router = np.eye(4)[[0, 3]] + (rng.normal(0, 0.1, (2, 4)) if exact else 0.0)
    plans = {layer: LayerPlan(np.eye(4)[[0, 3]] + rng.normal(0, 0.1, (2, 4)), router)
             for layer in moe_layers(model)}
    fast = FitnessEvaluator(model, calib, router_mode="exact" if exact else "onehot").logits(plans)
    applied = ir.verify(apply_plans(model, plans, router_mode="exact" if exact else "onehot"))
    assert (applied.blocks[0].ffn.router_map is not None) == exact
    slow = ReferenceExecutor(applied, "cpu").logits(calib.ids, calib.mask)
    assert torch.allclose(fast, slow, atol=1e-4)


def test_exact_router_map_is_refused_by_gguf(tiny_model, tmp_path):
    model = frontend.load(tiny_model("mixtral"))
    plans = {layer: LayerPlan(np.eye(8)[[0, 1]], np.eye(8)[[0, 1]] * 0.9 + 0.01)
             for layer in moe_layers(model)}
    mapped = apply_plans(model, plans, router_mode="exact")
    with pytest.raises(Exception, match="continuous matrix"):
        compile_model(mapped, tmp_path / "x.gguf", "gguf", F32, progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["frequency", "eep"])
def test_keeping_every_expert_is_bit_exact(tiny_model, calib_of, method):
    model = frontend.load(tiny_model("mixtral"))
    calib = calib_of(model)
    identity = apply_plans(model, {i: keep_plan(list(range(8)), 8) for i in moe_layers(model)})
    want = ReferenceExecutor(model, "cpu").logits(calib.ids, calib.mask)
    assert torch.equal(ReferenceExecutor(identity, "cpu").logits(calib.ids, calib.mask), want)
    pruned, _ = prune_experts(model, 8, method, calib, config=EEPConfig(evaluations=1),
                              progress=False)
    assert torch.equal(ReferenceExecutor(pruned, "cpu").logits(calib.ids, calib.mask), want)


def test_eep_is_deterministic_for_a_seed(tiny_model, calib_of):
    model = frontend.load(tiny_model("olmoe"))
    calib = calib_of(model)
    runs = [prune_experts(model, 3, "eep", calib, config=EEPConfig(
        evaluations=40, discrete_evals=20, max_init=8, seed=5), progress=False)[1]
        for _ in range(2)]
    for r in runs:
        r.pop("seconds")
    assert runs[0] == runs[1]
    assert runs[0]["evaluations"] == 40
    assert runs[0]["fitness"] >= max(runs[0]["baseline_fitness"].values())


def test_frequency_baseline_counts_what_transformers_routes(tiny_model, calib_of):
    """The frequency baseline keeps the experts transformers' own router picks most often."""
    folder = tiny_model("mixtral")
    model = frontend.load(folder)
    calib = calib_of(model)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(input_ids=calib.ids, attention_mask=calib.mask, output_router_logits=True)
    keep = calib.mask.reshape(-1).bool()
    plans = choose("frequency", model, collect_layer_io(model, calib), 3)
    for layer, logits in enumerate(out.router_logits):
        top = logits[keep].topk(2, dim=-1).indices.reshape(-1)
        counts = torch.bincount(top, minlength=8).tolist()
        want = sorted(sorted(range(8), key=lambda e: (-counts[e], e))[:3])
        assert plans[layer].kept == want


def test_reconstruct_with_all_but_one_expert_drops_the_least_harmful(tiny_model, calib_of):
    model = frontend.load(tiny_model("qwen3_moe"))
    calib = calib_of(model)
    io = collect_layer_io(model, calib)
    plans = choose("reconstruct", model, io, 7)
    ev = FitnessEvaluator(model, calib)
    for layer in moe_layers(model):
        # the chosen 7 reconstruct the layer output best (sum over examples of the Frobenius
        # norm of the error), computed here through the pruned-model forward instead
        errors = {}
        for dropped in range(8):
            plan = keep_plan([e for e in range(8) if e != dropped], 8)
            diff = ev._planned_moe(layer, io[layer].x, plan) - io[layer].y
            per_example = torch.zeros(calib.n_examples, dtype=torch.float64)
            per_example.index_add_(0, io[layer].example, diff.double().pow(2).sum(-1))
            errors[dropped] = float(per_example.sqrt().sum())
        chosen_drop = next(e for e in range(8) if e not in plans[layer].kept)
        assert errors[chosen_drop] == pytest.approx(min(errors.values()), rel=1e-6)


@pytest.mark.parametrize("argv,message", [
    (["--experts", "0", "--calib", "add"], "between 1 and"),
    (["--experts", "9", "--calib", "add"], "between 1 and"),
    (["--experts", "2", "--calib", "nosuchtask"], "unknown calibration task"),
    (["--experts", "2", "--calib", "add", "--search-budget", "lots"], "--search-budget"),
    (["--experts", "2", "--calib", "missing.jsonl"], "missing.jsonl"),
    (["--calib", "add"], "only apply with --experts"),
])
def test_bad_pruning_requests_exit_2(tiny_model, tmp_path, capsys, argv, message):
    out = tmp_path / "x.gguf"
    rc = main([str(tiny_model("mixtral")), "-o", str(out), "--quiet", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_cli_prunes_with_eep_and_records_the_choice(tiny_model, tmp_path):
    out = tmp_path / "p.gguf"
    rc = main([str(tiny_model("mixtral")), "-o", str(out), "--quiet", "--dtype", "f32",
               "--experts", "4", "--calib", "add,rev", "--calib-n", "4",
               "--search-budget", "30"])
    assert rc == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    entry = report["passes"][0]
    assert entry["method"] == "eep" and entry["evaluations"] == 30
    assert report["verification"]["passed"]
    from gguf import GGUFReader
    fields = GGUFReader(str(out)).fields
    history = json.loads(bytes(fields["moecompile.history"].parts[-1]).decode())
    assert history[0]["layers"] == entry["layers"]
    assert int(fields["llama.expert_count"].parts[-1][0]) == 4


@pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="bundled model missing")
def test_eep_not_below_the_best_baseline_on_the_bundled_model():
    model = frontend.load(BUNDLED)
    pruned, report = prune_experts(model, 2, "eep", "add,sort,rev", calib_n=8,
                                   config=EEPConfig(evaluations=60, seed=0), progress=False)
    assert report["fitness"] >= max(report["baseline_fitness"].values())
    # the pruned model, run as a model, scores what the search measured
    calib = build_calib(model, "add,sort,rev", 8)
    assert FitnessEvaluator(pruned, calib).fitness({}) == pytest.approx(report["fitness"], abs=1e-5)


def test_user_calibration_files_and_top_k_clamp(tiny_model, tmp_path):
    """A .jsonl scores exact match, a .txt scores agreement with the original (-KL); keeping
    fewer experts than the top-k clamps it."""
    model = frontend.load(tiny_model("mixtral"))
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": f"add {a}+1=", "answer": f" {a + 1}\n"})
                               for a in range(10, 16)))
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(40)))
    _, by_tasks = prune_experts(model, 3, "eep", str(jsonl), calib_n=6,
                                config=EEPConfig(evaluations=12, seed=1), progress=False)
    assert by_tasks["fitness_kind"] == "accuracy" and by_tasks["calib_examples"] == 6
    pruned, by_text = prune_experts(model, 1, "eep", str(text), calib_n=4,
                                    config=EEPConfig(evaluations=12, seed=1), progress=False)
    assert by_text["fitness_kind"] == "neg_kl" and by_text["fitness_unpruned"] == 0.0
    assert by_text["fitness"] <= 0.0 and by_text["fitness"] >= max(by_text["baseline_fitness"].values())
    assert by_text["top_k_clamped"] == [2, 1]
    assert all(b.ffn.top_k == 1 for b in pruned.blocks)


@pytest.mark.parametrize("method", ["frequency", "mass", "reap", "reconstruct"])
def test_streaming_pass_chooses_and_scores_as_the_token_major_one(tiny_model, calib_of,
                                                                  monkeypatch, method):
    """Above the streaming threshold, one layer-major pass gathers the statistics (for
    reconstruct, every subset's error; 4 experts keep 2: all 6 subsets) and another scores
    the result: the same experts, the same fitness."""
    from moecompile.runtime import streaming

    model = frontend.load(tiny_model("qwen2_moe"))
    calib = calib_of(model)
    pruned, small = prune_experts(model, 2, method, calib)
    monkeypatch.setattr(streaming, "STREAM_ABOVE", 0)
    streamed, large = prune_experts(model, 2, method, calib)
    assert large["executor"] == "streaming" and large["layers"] == small["layers"]
    assert large["fitness"] == pytest.approx(small["fitness"], abs=1e-5)
    assert large["fitness_unpruned"] == pytest.approx(small["fitness_unpruned"], abs=1e-5)
    assert large["coverage"]["least_routed"] >= 0


@pytest.mark.parametrize("router_mode", ["onehot", "exact"])
def test_streaming_eep_searches_as_the_token_major_one(tiny_model, calib_of, monkeypatch,
                                                       router_mode):
    """EEP above the streaming threshold scores its candidates layer-major: from the
    same starts (NAEE's reconstruct among them, from the one pass) the same search takes the
    same steps to the same experts and merge weights (both phases: 40 evaluations)."""
    from moecompile.runtime import streaming

    model = frontend.load(tiny_model("qwen3_moe"))
    calib = calib_of(model)
    config = EEPConfig(evaluations=40, discrete_evals=20, seed=3)
    run = PruneExperts(2, "eep", config, router_mode)
    _, small = apply(run, model, calib, 32, progress=False)
    monkeypatch.setattr(streaming, "STREAM_ABOVE", 0)
    _, large = apply(run, model, calib, 32, progress=False)
    assert large["executor"] == "streaming" and large["evaluations"] == small["evaluations"]
    assert large["baseline_fitness"] == pytest.approx(small["baseline_fitness"], abs=1e-5)
    assert large["layers"] == small["layers"]
    assert large["fitness"] == pytest.approx(small["fitness"], abs=1e-5)
    assert large["eta_seconds"] > 0 and large["seconds_per_evaluation"] >= 0


def test_a_long_streaming_eep_is_refused_unless_sized(tiny_model, calib_of, monkeypatch):
    """A default-length search whose measured ETA is over the limit stops with the ways to
    bound it; one the user sized (--search-budget) runs."""
    from moecompile.errors import UserError
    from moecompile.passes import prune_experts as module
    from moecompile.runtime import streaming

    model = frontend.load(tiny_model("olmoe"))
    calib = calib_of(model)
    monkeypatch.setattr(streaming, "STREAM_ABOVE", 0)
    monkeypatch.setattr(module, "ETA_LIMIT", 0.0)
    with pytest.raises(UserError, match="--search-budget.*reconstruct"):
        prune_experts(model, 2, "eep", calib, config=EEPConfig(evaluations=400))
    _, report = prune_experts(model, 2, "eep", calib,
                              config=EEPConfig(evaluations=6, asked=True))
    assert report["evaluations"] == 6


def test_streaming_text_fitness_is_the_top_k_kl(tiny_model, tmp_path, monkeypatch):
    from moecompile.runtime import streaming

    model = frontend.load(tiny_model("mixtral"))
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(60)))
    calib = build_calib(model, str(text), 3)
    _, small = prune_experts(model, 4, "frequency", calib)
    monkeypatch.setattr(streaming, "STREAM_ABOVE", 0)
    _, large = prune_experts(model, 4, "frequency", calib)
    # a vocabulary within TOP_K_REFERENCE: the top-K KL is the whole KL
    assert large["fitness"] < 0 and large["fitness"] == pytest.approx(small["fitness"], abs=1e-5)


def test_reap_keeps_the_experts_that_contribute_most(tiny_model, calib_of):
    model = frontend.load(tiny_model("olmoe"))
    calib = calib_of(model)
    io = collect_layer_io(model, calib)
    plans = choose("reap", model, io, 3)
    for layer, plan in plans.items():
        saliency = io[layer].reap
        assert sorted(plan.kept) == sorted(saliency.argsort(descending=True)[:3].tolist())
        assert (saliency >= 0).all() and saliency.max() > 0


@pytest.mark.parametrize("family,target,dtype", [("mixtral", "gguf", "q8_0"),
                                                  ("qwen3_moe", "gguf", "q8_0"),
                                                  ("mixtral", "onnx", "f32")])
def test_one_expert_per_layer_exports_and_verifies(tiny_model, tmp_path, family, target, dtype):
    """Pruned to one expert, a GGUF stacks a single expert: its leading axis still counts
    experts (the reference once read it as the expert itself and crashed, exit 3)."""
    out = tmp_path / f"one.{target}"
    rc = main([str(tiny_model(family)), "-o", str(out), "--quiet", "--target", target,
               "--dtype", dtype, "--experts", "1", "--prune-method", "frequency",
               "--calib", "add", "--calib-n", "4"])
    assert rc == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["verification"]["passed"]
    assert all(len(layer) == 1 for layer in report["passes"][0]["layers"])
