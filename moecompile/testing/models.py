"""Build tiny, random-weight Mixture-of-Experts checkpoints for tests and benchmarks.

Shipped in the package (as numpy.testing is) so tests and tools import it from the installed
package rather than from a path.

Nothing here touches a model hub: the tokenizer is trained locally on the Python
standard library's own source files and the weights are seeded random tensors.
Every builder is deterministic for a given seed, so two test sessions (or two
machines with the same Python/transformers versions) produce the same folders.

The tiny configs mirror the structure of the real models they stand for
(GQA, shared experts, q/k norms, qkv bias, ...) with every size shrunk, so a
converter that handles them is exercised on the same code paths as on the real
checkpoints. Weights are deliberately "loud":

* ``initializer_range`` 0.1 instead of 0.02, so logits spread out and the argmax
  of a forward pass is stable against small numeric differences;
* every RMSNorm weight becomes ``1 + 0.2 * randn`` and every bias ``0.1 * randn``
  after the usual init (which sets them to exactly 1 and 0), so a converter that
  drops a norm or a bias produces a visible mismatch instead of an identity op.

Checkpoint key layouts (verified with ``safetensors.safe_open``; ``L`` is a layer
index, ``E`` an expert index, ``D`` hidden size, ``F`` expert intermediate size):

``fused_experts=False`` (default, what ``save_pretrained`` writes and what the
hub checkpoints look like):

* mixtral: ``model.layers.L.block_sparse_moe.gate.weight`` [E, D] and
  ``model.layers.L.block_sparse_moe.experts.E.w1.weight`` (gate) [F, D],
  ``...experts.E.w3.weight`` (up) [F, D], ``...experts.E.w2.weight`` (down) [D, F];
* qwen2_moe / qwen3_moe / olmoe: ``model.layers.L.mlp.gate.weight`` [E, D] and
  ``model.layers.L.mlp.experts.E.gate_proj.weight`` [F, D],
  ``...experts.E.up_proj.weight`` [F, D], ``...experts.E.down_proj.weight`` [D, F];
  qwen2_moe additionally has ``model.layers.L.mlp.shared_expert.{gate,up,down}_proj.weight``
  and ``model.layers.L.mlp.shared_expert_gate.weight`` [1, D].

``fused_experts=True`` (transformers 5's in-memory layout, written with
``save_original_format=False``), for every arch including mixtral:

* ``model.layers.L.mlp.gate.weight`` [E, D],
* ``model.layers.L.mlp.experts.gate_up_proj`` [E, 2F, D] (gate rows first, then up),
* ``model.layers.L.mlp.experts.down_proj`` [E, D, F].

Note that mixtral's router moves from ``block_sparse_moe.`` to ``mlp.`` in fused
mode, because transformers renames the module on load and only reverts the
rename when saving in the original format.
"""

from __future__ import annotations

import importlib
import inspect
import shutil
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    OlmoeConfig,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
REPO = Path(__file__).resolve().parents[2]  # the source checkout, for tests and tools
BUNDLED = REPO / "models" / "moe-tiny"  # the bundled default model

SPECIAL_TOKEN = "<|endoftext|>"

# Stdlib modules whose source is the tokenizer's training text. A fixed, sorted
# list keeps training deterministic for a given Python version; the mix covers
# prose (docstrings), code, digits and punctuation.
_CORPUS_MODULES = ("base64", "bisect", "calendar", "heapq", "json.decoder", "string", "textwrap")

# Files of a tokenizer folder that are copied next to the weights.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Scale of the loud re-randomisation applied after the standard init (see module docstring).
_INIT_RANGE = 0.1
_NORM_JITTER = 0.2
_BIAS_SCALE = 0.1


def _corpus() -> list[str]:
    """Source text of the fixed stdlib modules, one string per file."""
    texts = []
    for name in _CORPUS_MODULES:
        path = inspect.getsourcefile(importlib.import_module(name))
        texts.append(Path(path).read_text(encoding="utf-8"))
    return texts


def train_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """Train a small byte-level BPE tokenizer and save it with transformers into ``out_dir``.

    Byte-level (GPT-2/Qwen style) so every string round-trips exactly, whatever
    its characters: the initial alphabet holds all 256 byte symbols. The single
    special token ``<|endoftext|>`` has id 0 and serves as bos, eos and pad.
    Writes ``tokenizer.json`` and ``tokenizer_config.json``. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    assert tok.token_to_id(SPECIAL_TOKEN) == 0

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        # Decoding must give back the exact text; the default clean-up would
        # e.g. turn " ." into "." and break round-trips.
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)
    return out_dir


def train_sentencepiece(out_file: Path, vocab_size: int = 400) -> Path:
    """A SentencePiece BPE ``tokenizer.model`` configured like Llama's and Mistral's (byte
    fallback, identity normalizer, whitespace kept, digits split), trained on the same stdlib
    corpus. Returns out_file."""
    import io

    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(line for text in _corpus() for line in text.splitlines() if line),
        model_writer=buffer, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, num_threads=1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama's
        split_digits=True, allow_whitespace_only_pieces=True)
    out_file.write_bytes(buffer.getvalue())
    return out_file


def _vocab_size(tokenizer_dir: Path) -> int:
    """Number of ids the tokenizer can emit, special tokens included."""
    return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def _common(vocab_size: int) -> dict:
    """Fields shared by every tiny config.

    ``pad_token_id`` stays None so no embedding row is zeroed by ``padding_idx``
    (token 0 is bos/eos/pad and should carry a real random embedding).
    """
    return dict(
        vocab_size=vocab_size,
        num_hidden_layers=2,
        max_position_embeddings=256,
        initializer_range=_INIT_RANGE,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
        tie_word_embeddings=False,
        num_experts_per_tok=2,
    )


def tiny_config(arch: str, vocab_size: int, **overrides) -> transformers.PretrainedConfig:
    """A tiny config of ``arch`` with the real model's structure; ``overrides`` win.

    Expert intermediate size (48) differs from hidden (64) so a transposed
    expert matrix cannot go unnoticed.
    """
    common = _common(vocab_size)
    if arch == "mixtral":
        # Mixtral-8x7B: GQA 32/8, 8 experts top-2, rope theta 1e6, no sliding window.
        kw = dict(
            hidden_size=64,
            intermediate_size=48,  # the expert FFN size in Mixtral
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=8,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            sliding_window=None,
        )
        cls = MixtralConfig
    elif arch == "qwen2_moe":
        # Qwen1.5-MoE-A2.7B: shared expert with sigmoid gate, qkv bias, no top-k renorm.
        kw = dict(
            hidden_size=64,
            intermediate_size=96,  # dense MLP size (unused while every layer is sparse)
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            norm_topk_prob=False,
            qkv_bias=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=False,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
        cls = Qwen2MoeConfig
    elif arch == "qwen3_moe":
        # Qwen3-30B-A3B: head_dim independent of hidden/heads, per-head q/k RMSNorm,
        # top-k weights renormalised, no attention bias.
        kw = dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=8,
            norm_topk_prob=True,
            attention_bias=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=False,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
        cls = Qwen3MoeConfig
    elif arch == "olmoe":
        # OLMoE-1B-7B: MHA (kv heads == heads), q/k RMSNorm over the whole projection,
        # no top-k renorm, no qkv clipping.
        kw = dict(
            hidden_size=64,
            intermediate_size=48,  # the expert FFN size in OLMoE
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            norm_topk_prob=False,
            clip_qkv=None,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        cls = OlmoeConfig
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return cls(**{**common, **kw, **overrides})


def olmoe_1b7b_config(num_hidden_layers: int = 2, vocab_size: int = 50304) -> OlmoeConfig:
    """OLMoE-1B-7B-0924's exact shapes with only ``num_hidden_layers`` layers, for benchmarks."""
    return OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=4096,
        norm_topk_prob=False,
        clip_qkv=None,
        tie_word_embeddings=False,
        initializer_range=0.02,
        pad_token_id=1,
        eos_token_id=50279,
    )


@torch.no_grad()
def _make_loud(model: torch.nn.Module, seed: int) -> None:
    """Re-randomise RMSNorm weights and biases, which the standard init leaves at 1 and 0."""
    gen = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if "RMSNorm" in type(module).__name__ and getattr(module, "weight", None) is not None:
            w = module.weight
            w.copy_(1 + _NORM_JITTER * torch.randn(w.shape, generator=gen, dtype=torch.float32))
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.copy_(_BIAS_SCALE * torch.randn(param.shape, generator=gen, dtype=torch.float32))


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    for name in _TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.exists():
            shutil.copy2(src, Path(out_dir) / name)


def build_random_checkpoint(
    config: transformers.PretrainedConfig,
    out_dir: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    fused_experts: bool = False,
    max_shard_size: str | None = None,
) -> Path:
    """Instantiate ``config`` with seeded random weights and save it to ``out_dir``.

    The model is created directly in ``dtype`` (``from_config(dtype=...)``), so
    peak memory is about the model's size plus what saving needs, not a float32
    copy. Norms and biases are re-randomised (see module docstring).
    ``fused_experts`` picks the key layout documented at the top of this module;
    ``max_shard_size`` (e.g. ``"200KB"``) makes save_pretrained write shards and
    ``model.safetensors.index.json``. Tokenizer files from ``tokenizer_dir`` are
    copied in when given. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    _make_loud(model, seed)

    save_kwargs = {"save_original_format": not fused_experts}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **save_kwargs)
    del model

    if tokenizer_dir is not None:
        _copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir


def build_tiny_model(
    arch: str,
    out_dir: Path,
    *,
    tokenizer_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    fused_experts: bool = False,
    max_shard_size: str | None = None,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Build a tiny random ``arch`` checkpoint (weights, config, tokenizer) in ``out_dir``.

    The vocabulary size is taken from the tokenizer so ids line up; without a
    ``tokenizer_dir`` a tokenizer is trained into ``out_dir`` first. See the
    module docstring for the key layout of each ``fused_experts`` mode.
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = train_tokenizer(out_dir)
    config = tiny_config(arch, _vocab_size(tokenizer_dir), **config_overrides)
    return build_random_checkpoint(
        config,
        out_dir,
        dtype=dtype,
        tokenizer_dir=None if Path(tokenizer_dir) == out_dir else tokenizer_dir,
        seed=seed,
        fused_experts=fused_experts,
        max_shard_size=max_shard_size,
    )


def hf_logits(folder, ids, attention_mask=None, **config_overrides) -> torch.Tensor:
    """transformers' own forward pass over `folder` in float32: the numerical reference."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **config_overrides)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask).logits


def random_ids(vocab: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def safetensors_keys(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """All tensor names in ``model_dir``'s safetensors files (sharded or not) with their shapes."""
    from safetensors import safe_open

    keys: dict[str, tuple[int, ...]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                keys[key] = tuple(f.get_slice(key).get_shape())
    return keys
