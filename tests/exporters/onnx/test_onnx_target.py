"""--target onnx end to end: IR → ONNX → real onnxruntime, against the reference executor and
transformers, both MoE lowerings, quantized weights, KV cache, external data, compressed models."""

import json

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompile import frontend
from moecompile.cli import main
from moecompile.exporters.onnx import lower
from moecompile.exporters.onnx.numerics import OnnxNumerics
from moecompile.exporters.onnx.target import ONNXTarget, kv_cache_bytes, linear_weights
from moecompile.exporters.target import TypeRequest
from moecompile.job import compile_model
from moecompile.runtime import ReferenceExecutor
from moecompile.runtime.onnx_runner import OnnxDecoder
from moecompile.testing.models import ARCHS
from moecompile.verify import compare_with_reference, fixed_tokens, verification_tokens

# expert widths that fill 32-wide blocks, so every expert tensor can be quantized (and QMoE used)
BLOCK_DIMS = {"mixtral": {"intermediate_size": 64}, "olmoe": {"intermediate_size": 64},
              "qwen2_moe": {"moe_intermediate_size": 64, "shared_expert_intermediate_size": 96},
              "qwen3_moe": {"moe_intermediate_size": 64}}


def reference(model, ids, numerics=None):
    return ReferenceExecutor(model, "cpu", numerics).logits(torch.tensor([ids]))[0].numpy()


def typed(model, kind):
    """Every linear weight stored as `kind` (int8/int4), the rest float32."""
    return model.with_types({p: kind for p in linear_weights(model)})


@pytest.mark.parametrize("moe", lower.MOE_LOWERINGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_f32_matches_reference_and_transformers(tiny_model, tmp_path, arch, moe):
    folder = tiny_model(arch)
    model = frontend.load(folder)
    result = lower.export(model, tmp_path / "m.onnx", moe=moe, progress=False)
    assert set(result.lowering.values()) == {moe}
    ids = fixed_tokens(model.vocab, 48)
    got = OnnxDecoder(result.path).sequence_logits(ids)
    ref = reference(model, ids)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(got - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("moe", lower.MOE_LOWERINGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_matches_reference_on_the_same_weights(tiny_model, tmp_path, arch, moe, kind):
    """Against the reference on the dequantized weights and int8-rounded activations ORT uses;
    the float model is far away (random weights are loud), the same numerics are not."""
    model = typed(frontend.load(tiny_model(arch, **BLOCK_DIMS[arch])), kind)
    result = lower.export(model, tmp_path / "q.onnx", moe=moe, progress=False)
    assert set(result.lowering.values()) == {moe}  # every expert fills whole blocks
    tokens = verification_tokens(model)
    decoder = OnnxDecoder(result.path)
    got, _ = decoder.step(tokens, np.ones_like(tokens), decoder.empty_cache(len(tokens)))
    verdict = compare_with_reference("onnxruntime", got, model, tokens, OnnxNumerics(model),
                                     "cpu")
    assert verdict.passed, verdict.summary()
    ids = fixed_tokens(model.vocab, 48)
    got = OnnxDecoder(result.path).sequence_logits(ids)
    same, floating = reference(model, ids, OnnxNumerics(model)), reference(model, ids)
    assert np.abs(got - same).mean() < np.abs(got - floating).mean() / 3


def test_kv_cache_generation_equals_recomputation(tiny_model, tmp_path):
    model = frontend.load(tiny_model("qwen3_moe"))
    path = lower.export(model, tmp_path / "m.onnx", moe="portable", progress=False).path
    decoder = OnnxDecoder(path)
    prompts = [fixed_tokens(model.vocab, 7, seed=1), fixed_tokens(model.vocab, 3, seed=2)]
    cached = decoder.greedy(prompts, max_new=12)
    for prompt, got in zip(prompts, cached):
        seq = list(prompt)
        for _ in range(12):  # no cache: the whole sequence again at every step
            seq.append(int(decoder.sequence_logits(seq)[-1].argmax()))
        assert got == seq[len(prompt):]
    assert all(len(g) == 12 for g in cached)


def test_cli_compiles_verifies_and_writes_side_files(tiny_model, tmp_path):
    folder = tiny_model("mixtral")
    out = tmp_path / "m.onnx"
    assert main([str(folder), "--target", "onnx", "-o", str(out), "--quiet"]) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["top1_agreement"] == 1.0
    assert report["moe_lowering"] == {"0": "ort", "1": "ort"}  # the fused form verifies here
    config = json.loads((tmp_path / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "m.onnx"
    assert (tmp_path / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "genai_config.json", "m.onnx", "m.report.json", "tokenizer.json", "tokenizer_config.json"]
    proto = onnx.load(str(out), load_external_data=False)
    assert proto.ir_version == 10 and {o.version for o in proto.opset_import} == {21, 1}
    names = [i.name for i in proto.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in names
    assert [o.name for o in proto.graph.output][:2] == ["logits", "present.0.key"]


@pytest.mark.parametrize("kind", [None, "int4"])
def test_external_data_saves_and_loads_by_path(tiny_model, tmp_path, kind):
    folder = tiny_model("olmoe", **BLOCK_DIMS["olmoe"])
    model = frontend.load(folder)
    out = tmp_path / "big.onnx"
    result = compile_model(model, out, ONNXTarget(moe="portable", external_at=0),
                           TypeRequest(quant=kind), progress=False)
    data = tmp_path / "big.onnx.data"
    assert result.passed and data.exists()
    assert out.stat().st_size < 200_000 < data.stat().st_size  # weights outside the proto
    proto = onnx.load(str(out), load_external_data=False)
    outside = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert outside and all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % 4096 == 0
                           for t in outside)
    ids = fixed_tokens(model.vocab, 32)
    inline = lower.export(typed(model, kind) if kind else model, tmp_path / "inline.onnx",
                          moe="portable", progress=False)
    assert inline.data_path is None
    np.testing.assert_array_equal(OnnxDecoder(out).sequence_logits(ids),
                                  OnnxDecoder(inline.path).sequence_logits(ids))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_pruned_topk_reduced_quantized_model_exports_and_verifies(tiny_model, tmp_path):
    folder = tiny_model("mixtral", **BLOCK_DIMS["mixtral"])
    out = tmp_path / "small.onnx"
    rc = main([str(folder), "--target", "onnx", "-o", str(out), "--experts", "4", "--top-k", "1",
               "--quant", "int4", "--calib", "add,rev", "--calib-n", "4", "--search-budget", "20",
               "--quiet"])
    assert rc == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert [p["pass"] for p in report["passes"]] == ["prune_experts", "top_k", "weight_types"]
    assert report["passes"][0]["router_mode"] == "exact"  # ONNX keeps EEP's router exact
    assert report["verification"]["passed"]
    names = {t["name"]: t["shape"] for t in report["tensors"]}
    assert not [n for n in names if ".experts.4." in n]  # four experts left per layer
    for layer, lowering in report["moe_lowering"].items():
        if lowering == "ort":
            assert names[f"blocks.{layer}.ffn.fc1.q"][0] == 4


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_exact_eep_router_exports_exactly(tiny_model, tmp_path, arch):
    """EEP's exact router (softmax → mapping matrix → top-k), which GGUF must refuse, runs here:
    a merged expert set with a continuous router map, F32, matches the reference exactly."""
    from moecompile.analysis.expert_plan import LayerPlan, apply_plans

    model = frontend.load(tiny_model(arch))
    rng = np.random.default_rng(0)
    n = model.blocks[0].ffn.n_experts
    plans = {}
    for layer in range(len(model.blocks)):
        router = rng.dirichlet(np.ones(n), size=3)  # 3 new experts, each a mix of router rows
        merge = np.eye(n)[[0, 2, 3]] * 0.7 + np.eye(n)[[1, 1, 0]] * 0.3
        plans[layer] = LayerPlan(merge, router)
    exact = apply_plans(model, plans, router_mode="exact")
    assert all(b.ffn.router_map is not None for b in exact.blocks)
    result = compile_model(exact, tmp_path / "e.onnx", ONNXTarget(moe="ort"), progress=False)
    assert result.passed and result.verification.top1_agreement == 1.0
    assert set(result.report["moe_lowering"].values()) == {"portable"}  # the map needs it


def test_dropped_moe_layer_exports(tiny_model, tmp_path):
    folder = tiny_model("olmoe")
    out = tmp_path / "d.onnx"
    assert main([str(folder), "--target", "onnx", "-o", str(out), "--drop-moe-layers", "1",
                 "--calib", "add,rev", "--calib-n", "4", "--quiet"]) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["passes"][0]["pass"] == "drop_moe_layers" and report["verification"]["passed"]
    assert len(report["moe_lowering"]) == 1  # one block kept its MoE, one has attention only


def test_per_expert_precision(tiny_model, tmp_path):
    """A map gives one expert int8 and the rest int4: the layer keeps the portable lowering
    (QMoE has one precision per layer), verified on the same numerics."""
    folder = tiny_model("olmoe", **BLOCK_DIMS["olmoe"])
    qmap = tmp_path / "map.json"
    qmap.write_text(json.dumps({r"blocks\.0\.ffn\.experts\.3\.": "int8", r"\.experts\.": "int4",
                                ".": "f32"}))
    out = tmp_path / "mixed.onnx"
    assert main([str(folder), "--target", "onnx", "-o", str(out), "--quant-map", str(qmap),
                 "--quiet"]) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    quantized = report["weights"]["quantized"]
    assert quantized["blocks.0.ffn.experts.3.down"] == "int8"
    assert quantized["blocks.0.ffn.experts.2.down"] == "int4"
    assert "blocks.0.attn.q" not in quantized
    assert report["moe_lowering"] == {"0": "portable", "1": "ort"}
    assert report["verification"]["passed"]


@pytest.mark.parametrize("extra,message", [
    (["--quant", "q4_k"], "--target onnx takes int8, int4 or auto"),
    (["--quant", "auto"], "--quant auto needs --budget SIZE"),
    (["--quant", "int8", "--budget", "10KB"], "this configuration needs"),
    (["--gpu-mem", "1GB"], "--gpu-mem plans for llama.cpp"),
    (["--dtype", "f16"], "writes float32 weights"),
    (["-o", "x.gguf"], "must end in .onnx"),
    (["--target", "gguf", "--onnx-moe", "ort"], "--onnx-moe applies to --target onnx"),
])
def test_onnx_flag_errors_exit_2(tiny_model, tmp_path, capsys, extra, message):
    folder = tiny_model("mixtral")
    argv = [str(folder), "--target", "onnx", "-o", str(tmp_path / "m.onnx"), "--quiet", *extra]
    if extra[0] == "-o":
        argv[4] = str(tmp_path / extra[1])
        argv = argv[:-2]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("moe", lower.MOE_LOWERINGS)
def test_onnxruntime_genai_drives_the_export(tiny_model, tmp_path, moe):
    """onnxruntime-genai, reading only the genai_config.json written beside the model, generates
    the same greedy tokens as our own cached loop."""
    og = pytest.importorskip("onnxruntime_genai")
    folder = tiny_model("qwen3_moe")
    out = tmp_path / "g.onnx"
    assert main([str(folder), "--target", "onnx", "--onnx-moe", moe, "-o", str(out), "--quiet"]) == 0
    eos = json.loads((tmp_path / "genai_config.json").read_text())["model"]["eos_token_id"]
    prompt = fixed_tokens(200, 6, seed=3)
    model = og.Model(str(tmp_path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 16, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    ours = OnnxDecoder(out).greedy([prompt], 16, eos=eos)[0]
    assert len(ours) >= 4 and theirs[:len(ours)] == ours


from moecompile.testing.models import BUNDLED  # noqa: E402


@pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="bundled model missing")
def test_quant_auto_chooses_per_expert_and_beats_uniform_int4(tmp_path):
    """Between the int4 and int8 sizes, --quant auto spends the bytes where the measured loss
    is: experts of one layer end up at different precisions, the file fits, and its KL to
    the original is below uniform int4's."""
    from moecompile.evaluation import evaluate

    model = frontend.load(BUNDLED)
    int4 = lower.weight_bytes(typed(model, "int4"))
    int8 = lower.weight_bytes(typed(model, "int8"))
    budget = (int4 + int8) // 2 + kv_cache_bytes(model, 512)
    uniform, auto = tmp_path / "u" / "int4.onnx", tmp_path / "a" / "auto.onnx"
    uniform.parent.mkdir(), auto.parent.mkdir()
    assert main([str(BUNDLED), "--target", "onnx", "-o", str(uniform), "--quant", "int4",
                 "--quiet"]) == 0
    assert main([str(BUNDLED), "--target", "onnx", "-o", str(auto), "--quant", "auto",
                 "--budget", str(budget), "--ctx", "512", "--calib", "all", "--calib-n", "8",
                 "--quiet"]) == 0
    report = json.loads(auto.with_suffix(".report.json").read_text())
    assert report["verification"]["passed"]
    assert report["memory"]["total_bytes"] <= budget
    assert report["tensor_bytes"] == report["memory"]["weights_bytes"]  # predicted == written
    units = report["quant"]["units"]
    experts = {kind for unit, kind in units.items() if ".experts." in unit}
    assert len(experts) > 1, units  # precision differs between experts
    kl = {p: evaluate(str(p), base=str(BUNDLED), tasks=["add", "sort"], n=16,
                      progress=False)["kl"] for p in (uniform, auto)}
    assert kl[auto] < kl[uniform]


def test_eval_runs_onnx_files(tiny_model, tmp_path):
    """tools/eval.py's engine on an .onnx: the F32 export against its own checkpoint (in
    transformers) has no divergence, and greedy completions come through the KV cache."""
    from moecompile.evaluation import evaluate

    folder = tiny_model("qwen3_moe")
    out = tmp_path / "m.onnx"
    assert main([str(folder), "--target", "onnx", "-o", str(out), "--quiet"]) == 0
    result = evaluate(str(out), base=str(folder), tasks=["add"], n=4, progress=False)
    assert result["kl"] < 1e-6 and result["top1_agreement"] == 1.0
    assert result["tasks"]["add"]["n"] == 4
