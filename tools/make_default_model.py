"""Write the bundled default model, `models/moe-tiny/`: a small random-weight Mixtral.

It exists so that the README's main command has something to compile on a fresh machine with
no model hub. Its weights are random (seeded); a trained replacement is a separate piece of
work. Same builders as the tests (tests/builders.py), so it goes through the same frontend as
any Hugging Face checkpoint.

    python tools/make_default_model.py [--out models/moe-tiny]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from builders import build_tiny_model, train_tokenizer  # noqa: E402

CONFIG = dict(hidden_size=128, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
              num_hidden_layers=2, max_position_embeddings=512)

CARD = """# moe-tiny (random weights)

A {params:,}-parameter Mixtral-architecture model (`MixtralForCausalLM`): hidden {hidden_size},
{num_hidden_layers} layers, {num_attention_heads} heads / {num_key_value_heads} KV heads,
{num_local_experts} experts (FFN {intermediate_size}), top-{num_experts_per_tok}, bf16.
Byte-level BPE tokenizer (512 tokens) trained locally on Python standard-library sources.

**The weights are random** (seed 0): this folder exists so `moecompile` has a bundled default
to compile on a machine without a model hub. It computes nothing useful.

Made by: `python tools/make_default_model.py`
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "moe-tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tok:
        tokenizer = train_tokenizer(Path(tok))
        args.out.mkdir(parents=True, exist_ok=True)
        build_tiny_model("mixtral", args.out, tokenizer_dir=tokenizer, dtype=torch.bfloat16,
                         seed=0, **CONFIG)
    from safetensors import safe_open

    with safe_open(str(args.out / "model.safetensors"), framework="pt") as f:
        params = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    (args.out / "README.md").write_text(CARD.format(params=params, **CONFIG))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
