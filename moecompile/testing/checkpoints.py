"""Random-weight checkpoints with real models' shapes, cached for benchmarks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


_BUILD_SCRIPT = """
import sys, torch
from moecompile.testing.models import build_random_checkpoint, olmoe_1b7b_config, train_tokenizer
out, layers = sys.argv[1], int(sys.argv[2])
tok = train_tokenizer(out + "/tokenizer")
build_random_checkpoint(olmoe_1b7b_config(num_hidden_layers=layers), out,
                        dtype=torch.bfloat16, tokenizer_dir=tok, seed=0)
"""


def ensure_model(work: Path, layers: int) -> Path:
    """The cached OLMoE-shaped checkpoint, built on first use.

    Built in a child process so torch never enters the calling benchmark's process, whose peak
    RSS may be what it measures; a `.complete` marker is written last so an interrupted build is redone, not reused."""
    out = work / f"olmoe-1b7b-{layers}l-bf16"
    if (out / ".complete").exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log(f"building a random {layers}-layer OLMoE-1B-7B-shaped checkpoint in {out} (~40 s/2 layers)")
    subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, str(out), str(layers)], check=True)
    shutil.rmtree(out / "tokenizer")  # its files were copied next to the weights
    (out / ".complete").write_text("")
    return out
