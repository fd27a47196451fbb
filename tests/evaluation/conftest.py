"""Fixtures for the evaluation tests: one tiny model, its F32 GGUF and ONNX, local lm-eval tasks.

The hub is off for the whole session and the Hugging Face cache is an empty temporary folder,
so a task can only run from the local files its YAML names, and one that needs the hub must
fail. datasets reads these variables when first imported (by lm_eval, after this file);
huggingface_hub may already have been imported by transformers (tests/conftest.py), so its
offline switch is also set directly.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
_HF_HOME = tempfile.mkdtemp(prefix="moecompile-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_HOME, "datasets")
import huggingface_hub.constants  # noqa: E402

huggingface_hub.constants.HF_HUB_OFFLINE = True

from moecompile.testing.eval_docs import ARC_DOCS, GEN_DOCS, MC_DOCS, ROOT, TEXT_DOCS  # noqa: E402


def _jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


@pytest.fixture(scope="session")
def tasks_dir(tmp_path_factory) -> Path:
    """A folder of lm-eval task YAMLs over local JSONL files: multiple choice (tiny_mc),
    rolling log-likelihood (tiny_text), greedy generation (tiny_gen), and lm-eval's own
    arc_easy `include:`d with local data in ARC's format (arc_easy_local)."""
    import lm_eval

    d = tmp_path_factory.mktemp("lm_eval_tasks")
    mc, text, gen = _jsonl(d / "mc.jsonl", MC_DOCS), _jsonl(d / "text.jsonl", TEXT_DOCS), \
        _jsonl(d / "gen.jsonl", GEN_DOCS)
    arc = _jsonl(d / "arc.jsonl", ARC_DOCS)
    (d / "tiny_mc.yaml").write_text(f"""\
task: tiny_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {json.dumps(str(mc))}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
""")
    (d / "tiny_text.yaml").write_text(f"""\
task: tiny_text
dataset_path: json
dataset_kwargs: {{data_files: {json.dumps(str(text))}}}
test_split: train
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: byte_perplexity}}, {{metric: bits_per_byte}}]
""")
    (d / "tiny_gen.yaml").write_text(f"""\
task: tiny_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {json.dumps(str(gen))}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 6, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
""")
    builtin = Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"
    (d / "arc_easy_local.yaml").write_text(f"""\
include: {json.dumps(str(builtin))}
task: arc_easy_local
tag: null
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files: {{test: {json.dumps(str(arc))}, train: {json.dumps(str(arc))}, validation: {json.dumps(str(arc))}}}
""")
    return d


@pytest.fixture(scope="session")
def qwen3(tiny_model) -> Path:
    return tiny_model("qwen3_moe")


@pytest.fixture(scope="session")
def compiled(qwen3, tmp_path_factory) -> dict[str, Path]:
    """The tiny qwen3_moe folder and its F32 GGUF and F32 ONNX, compiled by moecompile."""
    from moecompile.cli import main as compile_main

    out = tmp_path_factory.mktemp("compiled")
    gguf, onnx = out / "m.gguf", out / "onnx" / "m.onnx"
    onnx.parent.mkdir()
    assert compile_main([str(qwen3), "-o", str(gguf), "--dtype", "f32", "--quiet"]) == 0
    assert compile_main([str(qwen3), "--target", "onnx", "-o", str(onnx), "--quiet"]) == 0
    return {"hf": qwen3, "gguf": gguf, "onnx": onnx}


@pytest.fixture(scope="session")
def eval_main():
    """tools/eval.py's main(argv) -> exit code, loaded from its file (tools/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tools_eval", ROOT / "tools" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
