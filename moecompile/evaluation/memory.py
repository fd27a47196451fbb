"""Will a Hugging Face folder fit in memory in transformers? Asked before loading it.

Evaluating the original of a 47B-parameter Mixtral in transformers needs ~190 GB of float32
weights (backends.HFBackend loads every folder in float32, see its docstring). Letting
from_pretrained find that out means swapping or an OOM kill minutes later; this module reads
the parameter count from the safetensors headers (a few kB each, no weights read) and refuses
at once, naming what it would need and what there is.

Until the streaming executor (which runs a folder a few experts at a time) exists, refusal is
the answer at real size: evaluate the compiled GGUF/ONNX instead, which run in their runtimes
from memory maps as users run them. `check_hf_fits` is the one function that executor replaces.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..sizes import format_size
from ..errors import UserError

LOAD_BYTES_PER_PARAM = 4  # float32, whatever the stored dtype
_STORED_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}


def parameter_count(folder: Path) -> int:
    """Number of parameters stored in the folder: from the safetensors headers, or for
    pytorch_model*.bin checkpoints from their size and the dtype config.json names."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        total = 0
        for file in files:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    count = 1
                    for dim in info["shape"]:
                        count *= dim
                    total += count
        return total
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise UserError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    config = json.loads((folder / "config.json").read_text())
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return sum(f.stat().st_size for f in bins) // _STORED_BYTES.get(dtype, 4)


def activation_bytes(config: dict, batch: int, tokens: int) -> int:
    """A generous bound on one forward pass of `batch` sequences of `tokens`: the float32
    logits three times over (model output, float copy, numpy copy), 16 hidden-size vectors per
    token (residual, norms, q/k/v/o, expert inputs and outputs) and one layer's attention
    scores."""
    vocab = config.get("vocab_size", 0)
    hidden = config.get("hidden_size", 0)
    heads = config.get("num_attention_heads", 1)
    per_token = 3 * vocab + 16 * hidden
    return 4 * batch * tokens * (per_token + heads * tokens)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def hf_memory_needed(folder: Path, batch: int, tokens: int) -> dict:
    """Bytes to evaluate the folder in transformers: weights in float32 plus activations."""
    config = json.loads((Path(folder) / "config.json").read_text())
    params = parameter_count(folder)
    weights = params * LOAD_BYTES_PER_PARAM
    acts = activation_bytes(config, batch, tokens)
    return {"parameters": params, "weights": weights, "activations": acts,
            "total": weights + acts}


def check_hf_fits(folder: Path, batch: int, tokens: int, limit: int | None = None) -> dict:
    """The estimate of hf_memory_needed, or a UserError where it exceeds `limit` (default:
    the memory available now)."""
    need = hf_memory_needed(folder, batch, tokens)
    have = limit if limit is not None else available_memory()
    if have is not None and need["total"] > have:
        raise UserError(
            f"{folder}: evaluating it in transformers needs about {format_size(need['total'])} "
            f"({need['parameters'] / 1e9:.2f}B parameters in float32 = "
            f"{format_size(need['weights'])}, plus {format_size(need['activations'])} of "
            f"activations) but {format_size(have)} is available; evaluate the compiled "
            f".gguf/.onnx instead (they run in llama.cpp / ONNX Runtime from memory maps), or "
            f"on a machine with more memory")
    return need
