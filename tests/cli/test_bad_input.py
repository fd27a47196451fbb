"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moecompile.cli", *map(str, args)],
                          capture_output=True, text=True)


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_refused(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moecompile: error:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def outputs_in(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_missing_config(tiny_model, tmp_path, out_dir):
    folder = copy_model(tiny_model("mixtral"), tmp_path / "m")
    (folder / "config.json").unlink()
    assert_refused(run_cli(folder, "-o", out_dir / "x.gguf"), "config.json not found")
    assert outputs_in(out_dir) == []


def test_unknown_architecture(tiny_model, tmp_path, out_dir):
    folder = copy_model(tiny_model("mixtral"), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["FancyNewMoeForCausalLM"], model_type="fancy")
    (folder / "config.json").write_text(json.dumps(cfg))
    proc = run_cli(folder, "-o", out_dir / "x.gguf")
    assert_refused(proc, "unsupported architecture FancyNewMoeForCausalLM",
                   "MixtralForCausalLM", "OlmoeForCausalLM")
    assert outputs_in(out_dir) == []


def test_dense_model(tmp_path, out_dir, tokenizer_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    assert_refused(run_cli(tmp_path / "dense", "-o", out_dir / "x.gguf"), "dense (non-MoE)")
    assert outputs_in(out_dir) == []


def test_truncated_safetensors(tiny_model, tmp_path, out_dir):
    folder = copy_model(tiny_model("olmoe"), tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_refused(run_cli(folder, "-o", out_dir / "x.gguf"), "truncated safetensors file")
    assert outputs_in(out_dir) == []


def test_tensor_missing_from_checkpoint(tiny_model, tmp_path, out_dir):
    folder = copy_model(tiny_model("olmoe"), tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert_refused(run_cli(folder, "-o", out_dir / "x.gguf"),
                   "model.layers.1.self_attn.k_proj.weight", "missing")
    assert outputs_in(out_dir) == []


def test_index_names_a_tensor_no_shard_has(tiny_model, tmp_path, out_dir):
    folder = copy_model(tiny_model("qwen2_moe", dtype=torch.bfloat16, max_shard_size="200KB"),
                        tmp_path / "m")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.0.mlp.experts.99.up_proj.weight"] = shard
    index_file.write_text(json.dumps(index))
    assert_refused(run_cli(folder, "-o", out_dir / "x.gguf"),
                   "model.layers.0.mlp.experts.99.up_proj.weight", "in no shard")
    assert outputs_in(out_dir) == []


def test_pickled_checkpoint_is_refused(tiny_model, tmp_path, out_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model("mixtral") / "config.json", folder)
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    assert_refused(run_cli(folder, "-o", out_dir / "x.gguf"), "pickled", "safetensors")
    assert outputs_in(out_dir) == []


def test_unwritable_output(tiny_model, tmp_path):
    folder = tiny_model("mixtral")
    assert_refused(run_cli(folder, "-o", tmp_path / "no" / "such" / "dir" / "x.gguf"),
                   "does not exist")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_refused(run_cli(folder, "-o", blocker / "x.gguf"), "not a folder")
    assert outputs_in(tmp_path) == ["a-file"]


def test_output_write_error_leaves_nothing(tiny_model, tmp_path):
    """An OS error while writing (here: output name too long) is reported and cleaned up."""
    proc = run_cli(tiny_model("mixtral"), "-o", tmp_path / ("x" * 300 + ".gguf"), "--no-verify")
    assert_refused(proc, "File name too long")
    assert outputs_in(tmp_path) == []


def test_model_is_not_a_folder(tmp_path):
    assert_refused(run_cli(tmp_path / "nope", "-o", tmp_path / "x.gguf"), "not a directory")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["export", "verify"])
def test_ctrl_c_leaves_no_debris(tiny_model, tmp_path, monkeypatch, capsys, where):
    from moecompile.cli import main
    from moecompile.exporters.gguf import target, writer

    if where == "export":  # interrupted after the first chunk of tensor data was written
        original = writer.PlannedTensor.pieces

        def pieces_then_interrupt(self):
            yield from original(self)
            if self.name.startswith("blk.0.ffn"):
                raise KeyboardInterrupt

        monkeypatch.setattr(writer.PlannedTensor, "pieces", pieces_then_interrupt)
    else:
        monkeypatch.setattr(target, "run_llama_cpp", _interrupt)
    assert main([str(tiny_model("mixtral")), "-o", str(tmp_path / "x.gguf"), "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert outputs_in(tmp_path) == []


def test_output_folder_is_created_and_named_after_the_model(tiny_model, tmp_path):
    from moecompile.cli import main

    folder = tiny_model("olmoe")
    assert main([str(folder), "-o", f"{tmp_path / 'out'}/", "--quiet", "--dtype", "q8_0"]) == 0
    assert outputs_in(tmp_path / "out") == [f"{folder.name}-q8_0.gguf",
                                            f"{folder.name}-q8_0.report.json"]


# ----------------------------------------------------------------------- hostile checkpoints


def test_header_size_bomb_is_refused(tiny_model, tmp_path, out_dir):
    import struct

    folder = copy_model(tiny_model("mixtral"), tmp_path / "m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = struct.pack("<Q", 2**62)  # a header "larger" than any file
    weights.write_bytes(bytes(data))
    assert_refused(run_cli(folder, "-o", out_dir / "x.gguf"), "corrupt safetensors header")
    assert outputs_in(out_dir) == []


def test_tensor_offsets_past_the_end_are_refused(tiny_model, tmp_path, out_dir):
    import struct

    folder = copy_model(tiny_model("mixtral"), tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [0, 10**12]
    raw = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    assert_refused(run_cli(folder, "-o", out_dir / "x.gguf"), "truncated safetensors file")
    assert outputs_in(out_dir) == []


@pytest.mark.parametrize("field,value,words", [
    ("hidden_size", 10**12, "invalid IR"),
    ("num_hidden_layers", 10**9, "missing"),
    ("num_local_experts", 10**9, "missing"),
])
def test_absurd_config_is_refused(tiny_model, tmp_path, out_dir, field, value, words):
    folder = copy_model(tiny_model("mixtral"), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_refused(run_cli(folder, "-o", out_dir / "x.gguf"), words)
    assert outputs_in(out_dir) == []


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors",
                                  "sub/../../outside.safetensors"])
def test_index_naming_a_shard_outside_the_folder_is_refused(tiny_model, tmp_path, out_dir, name):
    source = tiny_model("qwen2_moe", dtype=torch.bfloat16, max_shard_size="200KB")
    folder = copy_model(source, tmp_path / "m")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(folder / first, tmp_path / "outside.safetensors")  # a real file out there
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    assert_refused(run_cli(folder, "-o", out_dir / "x.gguf"), repr(name), "inside the model folder")
    assert outputs_in(out_dir) == []


def test_hugging_face_cache_layout_of_symlinks_compiles(tiny_model, tmp_path, out_dir):
    """The hub cache keeps files in blobs/ and each snapshot as links to them: links are
    followed, only shard names are judged."""
    source = tiny_model("qwen2_moe", dtype=torch.bfloat16, max_shard_size="200KB")
    blobs = tmp_path / "models--org--tiny" / "blobs"
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(source.iterdir())):
        blob = blobs / f"{i:040x}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    proc = run_cli(snapshot, "-o", out_dir / "x.gguf", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert outputs_in(out_dir) == ["x.gguf", "x.report.json"]


def test_ctrl_c_at_real_size_resumes_to_the_same_bytes(tiny_model, tmp_path, monkeypatch, capsys):
    """A model above the streaming threshold (forced here), Ctrl-C during a layer-major pass,
    then the same command: it resumes and writes exactly the file an uninterrupted run writes."""
    from moecompile.cli import main
    from moecompile.runtime import streaming
    from moecompile.runtime.resume import ENV

    monkeypatch.setattr(streaming, "STREAM_ABOVE", 0)
    monkeypatch.setenv(ENV, str(tmp_path / "resume"))
    folder = tiny_model("mixtral", num_hidden_layers=3)
    argv = [str(folder), "--experts", "4", "--prune-method", "reap", "--calib", "add",
            "--calib-n", "3", "--no-verify", "--quiet"]
    assert main(argv + ["-o", str(tmp_path / "clean.gguf")]) == 0
    original = streaming.Observer.block
    calls = []

    def interrupt_once(self, block, *args):
        calls.append(block)
        if block == 2 and calls.count(2) == 1:
            raise KeyboardInterrupt
        return original(self, block, *args)

    monkeypatch.setattr(streaming.Observer, "block", interrupt_once)
    out = tmp_path / "out"
    out.mkdir()
    assert main(argv + ["-o", str(out / "m.gguf")]) == 130
    assert outputs_in(out) == [] and "interrupted" in capsys.readouterr().err
    assert main(argv + ["-o", str(out / "m.gguf")]) == 0
    assert (out / "m.gguf").read_bytes() == (tmp_path / "clean.gguf").read_bytes()
    assert not list((tmp_path / "resume").iterdir())


def test_a_long_eep_at_real_size_is_refused_with_its_eta(tiny_model, tmp_path, monkeypatch,
                                                         capsys):
    """Above the streaming threshold (forced here) EEP scores its candidates layer-major; a
    default-length search whose measured ETA is over the limit (0 here) exits 2 in one
    line with the time and what bounds it, leaving no output; sized with --search-budget it
    compiles, and so does reconstruct (NAEE's layer-local search)."""
    from moecompile.cli import main
    from moecompile.passes import prune_experts
    from moecompile.runtime import streaming

    monkeypatch.setattr(streaming, "STREAM_ABOVE", 0)
    monkeypatch.setattr(prune_experts, "ETA_LIMIT", 0.0)
    folder = tiny_model("mixtral")
    capsys.readouterr()  # the fixture's own output
    argv = [str(folder), "--experts", "6", "--calib", "add", "--calib-n", "2", "--no-verify",
            "--quiet"]
    assert main(argv + ["-o", str(tmp_path / "eep.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "evaluations take about" in err
    assert "--search-budget" in err and "reconstruct" in err
    assert list(tmp_path.iterdir()) == []
    assert main(argv + ["--search-budget", "4", "-o", str(tmp_path / "e.gguf")]) == 0
    assert main(argv + ["--prune-method", "reconstruct", "-o", str(tmp_path / "r.gguf")]) == 0
    assert (tmp_path / "e.gguf").stat().st_size > 0 and (tmp_path / "r.gguf").stat().st_size > 0
