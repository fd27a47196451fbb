"""The GGUF target end to end: checkpoint → moecompile → GGUF → real llama.cpp, compared with
transformers; refusals; a broken export caught by verification."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

from moecompile import frontend
from moecompile.cli import main
from moecompile.exporters.gguf import writer
from moecompile.exporters.target import TypeRequest
from moecompile.job import compile_model
from moecompile.runtime import ReferenceExecutor
from moecompile.runtime.llama_worker import run_llama_cpp
from moecompile.testing.models import ARCHS, hf_logits, random_ids
from moecompile.verify import fixed_tokens


def transformers_logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def compile_cli(folder, out, *extra):
    rc = main([str(folder), "--target", "gguf", "-o", str(out), "--quiet", *extra])
    report = json.loads(out.with_suffix(".report.json").read_text())
    return rc, report


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_export_matches_transformers(tiny_model, tmp_path, arch):
    folder = tiny_model(arch)
    out = tmp_path / f"{arch}.gguf"
    rc, report = compile_cli(folder, out, "--dtype", "f32")
    assert rc == 0 and out.exists()
    assert report["verification"]["passed"] and report["verification"]["top1_agreement"] == 1.0
    ids = fixed_tokens(report_vocab(report), 40, seed=7)
    got = run_llama_cpp(out, [ids])[0]
    want = transformers_logits(folder, ids)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert np.abs(got - want).max() <= 1e-3
    assert not list(tmp_path.glob(".*tmp*")), "temporary files must not be left behind"


def report_vocab(report):
    return next(t["shape"][0] for t in report["tensors"] if t["name"] == "token_embd.weight")


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_export_verifies_against_dequantized_reference(tiny_model, tmp_path, arch):
    out = tmp_path / f"{arch}-q8.gguf"
    rc, report = compile_cli(tiny_model(arch), out, "--dtype", "q8_0")
    v = report["verification"]
    assert rc == 0, v
    assert v["top1_agreement"] >= 0.98
    # agreement with the float model is reported (rounding may move a tiny model's argmax)
    assert 0.0 <= v["top1_agreement_float"] <= 1.0 and v["max_abs_diff_float"] > 0
    types = {t["name"]: t["type"] for t in report["tensors"]}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_exports_verify(tiny_model, tmp_path, dtype):
    out = tmp_path / f"m-{dtype}.gguf"
    rc, report = compile_cli(tiny_model("qwen3_moe"), out, "--dtype", dtype)
    assert rc == 0 and report["verification"]["top1_agreement"] >= 0.98
    assert {t["type"] for t in report["tensors"]} == {"F32", dtype.upper()}


def test_q8_0_falls_back_to_f16_where_rows_do_not_fit_blocks(tiny_model, tmp_path):
    folder = tiny_model("olmoe", intermediate_size=40)  # expert rows of 40: not a multiple of 32
    out = tmp_path / "odd.gguf"
    rc, report = compile_cli(folder, out, "--dtype", "q8_0")
    assert rc == 0
    types = {t["name"]: t["type"] for t in report["tensors"]}
    assert types["blk.0.ffn_down_exps.weight"] == "F16"  # row length = expert FFN size = 40
    assert types["blk.0.ffn_up_exps.weight"] == "Q8_0"  # row length = hidden size
    reader = GGUFReader(out)  # the report's byte count is exactly the file's tensor data
    assert sum(int(t.n_bytes) for t in reader.tensors) == report["tensor_bytes"]


def test_fused_expert_checkpoint_exports(tiny_model, tmp_path):
    rc, report = compile_cli(tiny_model("mixtral", fused_experts=True), tmp_path / "f.gguf",
                             "--dtype", "f32")
    assert rc == 0 and report["verification"]["top1_agreement"] == 1.0


def test_sharded_bf16_checkpoint_exports(tiny_model, tmp_path):
    folder = tiny_model("qwen2_moe", dtype=torch.bfloat16, max_shard_size="200KB")
    rc, report = compile_cli(folder, tmp_path / "s.gguf", "--dtype", "bf16")
    assert rc == 0 and report["verification"]["passed"]


def test_qwen3_without_topk_renormalisation_is_refused(tiny_model, tmp_path, capsys):
    folder = tiny_model("qwen3_moe", norm_topk_prob=False)
    out = tmp_path / "q3.gguf"
    assert main([str(folder), "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "renormalises" in err and "norm_topk_prob=false" in err
    assert list(tmp_path.iterdir()) == []


def test_wrong_export_fails_verification_and_is_kept_under_a_failed_name(
        tiny_model, tmp_path, monkeypatch):
    """Skip the llama-arch q/k permutation: llama.cpp then computes different logits."""
    monkeypatch.setattr(writer, "_permute_rows", lambda n_heads: None)
    model = frontend.load(tiny_model("mixtral"))
    out = tmp_path / "bad.gguf"
    result = compile_model(model, out, "gguf", TypeRequest(dtype="f32"), device="cpu",
                           progress=False)
    assert not result.passed and result.verification.max_abs_diff > 1e-2
    assert not out.exists() and (tmp_path / "bad.FAILED.gguf").exists()
    assert json.loads((tmp_path / "bad.report.json").read_text())["verification"]["passed"] is False


TOKENIZE = textwrap.dedent("""
    import json, sys
    from llama_cpp import Llama
    llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
    out = []
    for text in json.loads(sys.argv[2]):
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        out.append([ids, llm.detokenize(ids, special=True).decode()])
    print(json.dumps(out))
""")


TEXTS = ["def f(x):\n    return x + 1\n", "  leading spaces and  double", "digits 1234567 3.14",
         "unicode: café, naïve, 日本語, emoji 🙂", "it's we'll they've", "\n\n\ttabs\r\n"]


def llama_tokenize(gguf_file, texts):
    """(ids, detokenized text) per text from llama.cpp's own tokenizer, in a subprocess."""
    proc = subprocess.run([sys.executable, "-c", TOKENIZE, str(gguf_file), json.dumps(texts)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def test_bpe_tokenizer_round_trip_matches_tokenizers(tiny_model, tmp_path):
    from tokenizers import Tokenizer

    folder = tiny_model("olmoe")
    out = tmp_path / "tok.gguf"
    assert main([str(folder), "-o", str(out), "--quiet", "--no-verify"]) == 0
    texts = TEXTS + ["<|endoftext|>tail"]
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text, (ids, back) in zip(texts, llama_tokenize(out, texts)):
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert back == text


def test_sentencepiece_tokenizer_matches_sentencepiece(tiny_model, tmp_path):
    import sentencepiece

    from moecompile.testing.models import train_sentencepiece

    folder = tmp_path / "spm-model"
    shutil.copytree(tiny_model("mixtral"), folder)
    spm = train_sentencepiece(folder / "tokenizer.model")  # preferred over tokenizer.json
    out = tmp_path / "spm.gguf"
    assert main([str(folder), "-o", str(out), "--quiet", "--no-verify"]) == 0
    assert GGUFReader(out).get_field("tokenizer.ggml.model").contents() == "llama"
    reference = sentencepiece.SentencePieceProcessor(model_file=str(spm))
    for text, (ids, back) in zip(TEXTS, llama_tokenize(out, TEXTS)):
        assert ids == reference.encode(text), text
        assert back.lstrip(" ") == reference.decode(ids).lstrip(" ")


def test_dense_layers_run_in_the_reference_but_are_refused_for_gguf(tiny_model, tmp_path, capsys):
    """Qwen's mlp_only_layers mixes dense layers in; llama.cpp's qwen3moe graph cannot."""
    folder = tiny_model("qwen3_moe", mlp_only_layers=[1])
    model = frontend.load(folder)
    assert type(model.blocks[1].ffn).__name__ == "Dense"
    ids = random_ids(model.vocab, (1, 12))
    ours = ReferenceExecutor(model, "cpu").logits(ids)
    assert (ours - hf_logits(folder, ids)).abs().max().item() <= 1e-4
    assert main([str(folder), "-o", str(tmp_path / "d.gguf"), "--quiet"]) == 2
    assert "layer(s) [1] are dense" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
