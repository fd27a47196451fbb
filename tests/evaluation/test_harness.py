"""The lm-evaluation-harness model (MoeLM) and the harness runs behind tools/eval.py --lm-eval.

Real lm-eval, real transformers / llama.cpp / ONNX Runtime, local task data only (the hub is off
for the session: see conftest.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional extra [eval]")

from lm_eval.api.instance import Instance  # noqa: E402

from moecompile.evaluation.backends import HFBackend, open_backend  # noqa: E402
from moecompile.evaluation.benchmarks import run_lm_eval  # noqa: E402
from moecompile.evaluation.harness import MoeLM  # noqa: E402
from moecompile.evaluation.loglik import continuation_logprobs, encode_pair  # noqa: E402
from moecompile.evaluation.user_tasks import load_user_tasks, score_multiple_choice  # noqa: E402

from moecompile.testing.eval_docs import ARC_DOCS  # noqa: E402

SPECS = ["tiny_mc", "tiny_text", "tiny_gen"]


def _reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """float64 log-softmax of the transformers model's own logits for one unpadded sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def test_loglikelihood_is_the_sum_over_the_models_own_logits(qwen3):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(qwen3)
    lm = MoeLM(HFBackend(qwen3), batch_size=8)
    requests = [("def add(a, b):\n    return", " a + b"),  # different lengths: one padded batch
                ("import os\nimport ", "sys"),  # trailing space moves to the continuation
                ("x", " = 1\n" * 6),
                ("", "hello world")]  # empty context: conditioned on the prefix token
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    assert len(got) == len(requests)
    for (ctx, cont), (logprob, greedy) in zip(requests, got):
        if ctx:
            ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()):] + cont
            ctx_ids = tok.encode(ctx, add_special_tokens=False)
            cont_ids = tok.encode(ctx + cont, add_special_tokens=False)[len(ctx_ids):]
        else:
            ctx_ids, cont_ids = [lm.prefix_token_id], tok.encode(cont, add_special_tokens=False)
        logp = _reference_logprobs(model, ctx_ids + cont_ids)
        rows = logp[len(ctx_ids) - 1:len(ctx_ids) - 1 + len(cont_ids)]
        expected = float(rows[torch.arange(len(cont_ids)), torch.tensor(cont_ids)].sum())
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont_ids)).all())
        assert logprob < 0


def test_rolling_loglikelihood_scores_every_token_in_disjoint_windows(qwen3):
    """Text longer than the window: the first window is conditioned on the prefix token; each
    later one predicts the next `window` tokens (fewer at the end) from the window of tokens
    before them, as lm-eval's rolling windows do; every token is scored exactly once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(qwen3)
    window = 16
    lm = MoeLM(HFBackend(qwen3, context=window))
    text = "def main():\n    return sum(range(10))\n" * 3
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 2 * window and len(ids) % window  # full windows and a partial last one
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    logp = _reference_logprobs(model, [lm.prefix_token_id] + ids[:window - 1])
    expected = float(logp[torch.arange(window), torch.tensor(ids[:window])].sum())
    scored = window
    for start in range(window, len(ids), window):
        end = min(start + window, len(ids))
        logp = _reference_logprobs(model, ids[end - 1 - window:end - 1])[window - (end - start):]
        expected += float(logp[torch.arange(end - start), torch.tensor(ids[start:end])].sum())
        scored += end - start
    assert scored == len(ids)
    assert got == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_greedy_and_stops_at_the_until_strings(qwen3):
    backend = HFBackend(qwen3)
    lm = MoeLM(backend)
    prompt = "import os\n"
    free = backend.decode(backend.greedy([backend.encode(prompt)], 12)[0])
    assert len(free) > 2
    stop = free[1:3]  # a stop string that occurs in the free continuation
    got = lm.generate_until([
        Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 0),
        Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 12}), 1)])
    assert got == [free[:free.index(stop)], free]
    from moecompile.errors import UserError

    with pytest.raises(UserError, match="greedily"):
        lm.generate_until([Instance("generate_until", {},
                                    (prompt, {"until": [], "do_sample": True}), 0)])


def test_same_tasks_score_identically_on_hf_gguf_and_onnx(compiled, tasks_dir):
    """Multiple choice, rolling perplexity and generation on three documents each: the folder
    in transformers, its F32 GGUF in llama.cpp and its F32 ONNX in ONNX Runtime agree."""
    results = {kind: run_lm_eval(open_backend(path), SPECS, [str(tasks_dir)])
               for kind, path in compiled.items()}
    hf = results["hf"]
    assert {t: hf[t]["n"] for t in SPECS} == {t: 3 for t in SPECS}
    lls = np.array([c[0] for doc in hf["tiny_mc"]["outputs"].values() for c in doc])
    assert len(lls) == 9 and np.isfinite(lls).all() and (lls < 0).all() and np.ptp(lls) > 0.1
    for kind in ("gguf", "onnx"):
        other = results[kind]
        for doc, choices in hf["tiny_mc"]["outputs"].items():
            assert [c[0] for c in other["tiny_mc"]["outputs"][doc]] == pytest.approx(
                [c[0] for c in choices], abs=2e-3), kind
        acc = other["tiny_mc"]["metrics"]["acc"]["per_doc"]
        assert acc == hf["tiny_mc"]["metrics"]["acc"]["per_doc"], kind
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert other["tiny_text"]["metrics"][metric]["value"] == pytest.approx(
                hf["tiny_text"]["metrics"][metric]["value"], rel=1e-4), (kind, metric)
        assert other["tiny_gen"]["outputs"] == hf["tiny_gen"]["outputs"], kind
    assert hf["tiny_text"]["metrics"]["word_perplexity"]["value"] > 1.0
    assert hf["tiny_text"]["metrics"]["word_perplexity"]["per_doc"] is None  # not a mean


def test_builtin_task_included_with_local_data_uses_its_own_prompt(qwen3, tasks_dir):
    """lm-eval's arc_easy, `include:`d with local ARC-format data: three documents scored with
    arc_easy's own prompt ("Question: …\\nAnswer:") and choice/target mapping."""
    backend = HFBackend(qwen3)
    result = run_lm_eval(backend, ["arc_easy_local"], [str(tasks_dir)])["arc_easy_local"]
    assert result["n"] == 3 and set(result["metrics"]) == {"acc", "acc_norm"}
    for doc_id, doc in enumerate(ARC_DOCS):
        requests = [encode_pair(backend.encode, f"Question: {doc['question']}\nAnswer:", " " + c)
                    for c in doc["choices"]["text"]]
        expected = [lp for lp, _ in continuation_logprobs(backend, requests)]
        got = [c[0] for c in result["outputs"][str(doc_id)]]
        assert got == pytest.approx(expected, abs=1e-4)  # batches pad differently
        right = doc["choices"]["label"].index(doc["answerKey"])
        assert result["metrics"]["acc"]["per_doc"][str(doc_id)] == float(
            int(np.argmax(expected)) == right)


def test_user_jsonl_and_lm_eval_yaml_score_the_same_documents_alike(qwen3, tasks_dir):
    """The same multiple-choice JSONL through --tasks FILE.jsonl (no lm-eval) and through an
    lm-eval YAML: the same log-likelihood for every choice."""
    backend = HFBackend(qwen3)
    harness = run_lm_eval(backend, ["tiny_mc"], [str(tasks_dir)])["tiny_mc"]
    ours = score_multiple_choice(backend, load_user_tasks(tasks_dir / "mc.jsonl"))
    for doc_id, r in enumerate(ours):
        assert r["loglikelihoods"] == pytest.approx(
            [c[0] for c in harness["outputs"][str(doc_id)]], abs=1e-4)
        assert r["score"] == harness["metrics"]["acc"]["per_doc"][str(doc_id)]


def test_a_task_whose_data_is_missing_exits_2_with_its_name(qwen3, tasks_dir, tmp_path, capsys,
                                                            eval_main):
    main = eval_main
    # a built-in task: its dataset is on the hub, which is off, and the cache is empty
    assert main([str(qwen3), "--lm-eval", "arc_easy", "--quiet"]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("eval:")]
    assert line.startswith("eval: error: lm-eval task arc_easy") and "cannot be loaded" in line
    assert "OfflineModeIsEnabled" in line  # refused because the hub is off, not a timeout
    assert "Traceback" not in err
    # a local task whose file is gone
    yaml = tmp_path / "gone.yaml"
    yaml.write_text((tasks_dir / "tiny_mc.yaml").read_text()
                    .replace("tiny_mc", "gone_task").replace(str(tasks_dir / "mc.jsonl"),
                                                             str(tmp_path / "missing.jsonl")))
    assert main([str(qwen3), "--lm-eval", str(yaml), "--quiet"]) == 2
    assert "lm-eval task" in capsys.readouterr().err
    assert main([str(qwen3), "--lm-eval", "no_such_task_xyz", "--lm-eval-include",
                 str(tasks_dir), "--quiet"]) == 2
    assert "no_such_task_xyz: not a task" in capsys.readouterr().err


def test_cli_side_by_side_with_paired_ci_and_json(compiled, tasks_dir, tmp_path, capsys,
                                                  eval_main):
    """The issue's "done when", on every kind of file: MODEL against the original folder with an
    lm-eval task and a text, printed side by side, every document kept in the JSON."""
    main = eval_main

    text = tmp_path / "text.txt"
    text.write_text(json.dumps(ARC_DOCS, indent=1) * 8)
    for kind in ("gguf", "onnx", "hf"):
        out = tmp_path / f"{kind}.json"
        rc = main([str(compiled[kind]), "--base", str(compiled["hf"]), "--lm-eval",
                   str(tasks_dir / "tiny_mc.yaml"), "--text", str(text), "--ctx", "64",
                   "--chunks", "4", "--json", str(out), "--quiet"])
        printed = capsys.readouterr().out
        assert rc == 0, kind
        assert "| tiny_mc | acc | 3 |" in printed and "Mean KLD(base‖model)" in printed
        assert "Same top p" in printed and "Mean PPL(base)" in printed
        data = json.loads(out.read_text())
        acc = data["tasks"]["tiny_mc"]["metrics"]["acc"]
        assert set(acc["model"]["per_doc"]) == set(acc["base"]["per_doc"]) == {"0", "1", "2"}
        assert acc["paired"]["n"] == 3 and acc["paired"]["diff"] == 0.0
        assert len(data["tasks"]["tiny_mc"]["outputs"]["base"]) == 3
        assert data["text"]["kl"]["mean"] < 1e-6 and data["text"]["same_top"]["p"] == 1.0
        assert data["text"]["chunks"] == 4 and data["text"]["tokens"] == 4 * (64 - 1 - 32)


def test_bundled_suite_as_an_lm_eval_task(tmp_path):
    """suite_tasks' YAML runs in lm-eval on the bundled model: 2 prompts per task, and the
    trained model picks the right answer among near misses more often than chance (1 in 4)."""
    from moecompile.testing.eval_docs import BUNDLED

    from moecompile.evaluation.suite_tasks import write_suite_task

    yaml = write_suite_task(tmp_path, n=2)
    backend = HFBackend(BUNDLED)
    result = run_lm_eval(backend, [str(yaml)])["moe_tiny_mc"]
    assert result["n"] == 12
    ours = score_multiple_choice(backend, load_user_tasks(yaml.with_suffix(".jsonl")))
    assert [r["score"] for r in ours] == [result["metrics"]["acc"]["per_doc"][str(i)]
                                          for i in range(12)]
    assert result["metrics"]["acc"]["value"] > 0.5


def test_llama_cpp_and_transformers_stop_generating_at_a_stop_string(compiled):
    """Stopping early saves time only: the text up to the stop string is the same."""
    for kind in ("gguf", "hf"):
        backend = open_backend(compiled[kind])
        prompt = [backend.encode("import os\n")]
        free = backend.greedy(prompt, 12)[0]
        text = backend.decode(free)
        stop = text[2:4]
        early = backend.greedy(prompt, 12, stop=[stop])[0]
        assert len(early) < len(free), kind
        assert backend.decode(early).split(stop)[0] == text.split(stop)[0], kind
