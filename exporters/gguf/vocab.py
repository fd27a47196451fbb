"""Tokenizer metadata for GGUF: llama.cpp must tokenize exactly like the source tokenizer.

Byte-level BPE (`tokenizer.json`) becomes llama.cpp's "gpt2" tokenizer model with a `pre`
(pre-tokenizer regex family) chosen from the tokenizer's own pre-tokenizer definition — never
guessed: a pre-tokenizer llama.cpp has no equivalent for is refused, because llama.cpp would
silently split text differently. SentencePiece (`tokenizer.model`) becomes the "llama" model
with its pieces, scores and types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from moecompile import ir
from moecompile.errors import UserError

# llama.cpp token types (llama_token_type / gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes of known BPE families → llama.cpp `tokenizer.ggml.pre` names.
_KNOWN_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


@dataclass
class Vocab:
    model: str  # "gpt2" | "llama" | "none"
    pre: str | None
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None
    add_space_prefix: bool | None = None
    specials: dict[str, int] = field(default_factory=dict)  # ids the tokenizer file defines


def read_vocab(tok: ir.Tokenizer | None, n_vocab: int) -> Vocab:
    """The vocabulary padded to the embedding's row count, as llama.cpp requires."""
    if tok is None:
        return Vocab("none", None, [], [], [], None)
    path = Path(tok.path)
    if (path / "tokenizer.model").exists():
        return _sentencepiece_vocab(path / "tokenizer.model", n_vocab)
    return _bpe_vocab(path / "tokenizer.json", n_vocab)


def _pad(tokens: dict[int, str], types: dict[int, int], n_vocab: int, where: Path):
    if tokens and max(tokens) >= n_vocab:
        raise UserError(f"{where}: tokenizer has token id {max(tokens)} but the embedding has "
                        f"only {n_vocab} rows")
    out_tokens, out_types, seen = [], [], set()
    for i in range(n_vocab):
        text = tokens.get(i)
        kind = types.get(i, NORMAL)
        if text is None:
            text, kind = f"[PAD{i}]", UNUSED
        elif text == "":
            text = f"[EMPTY_{i}]"
        if text in seen:
            raise UserError(f"{where}: token string {text!r} appears twice; llama.cpp needs "
                            "unique token strings")
        seen.add(text)
        out_tokens.append(text)
        out_types.append(kind)
    return out_tokens, out_types


def _pre_name(pre_tokenizer: dict | None, where: Path) -> str:
    """Map a tokenizers pre-tokenizer definition onto llama.cpp's pre-tokenizer names."""
    if not pre_tokenizer:
        raise UserError(f"{where}: BPE tokenizer without a pre-tokenizer is not supported")
    kind = pre_tokenizer.get("type")
    if kind == "ByteLevel":
        if pre_tokenizer.get("add_prefix_space"):
            raise UserError(f"{where}: ByteLevel add_prefix_space=True has no llama.cpp equivalent")
        if pre_tokenizer.get("use_regex", True):
            return "gpt-2"
    if kind == "Sequence":
        parts = pre_tokenizer.get("pretokenizers", [])
        splits = [p for p in parts if p.get("type") == "Split"]
        levels = [p for p in parts if p.get("type") == "ByteLevel"]
        if len(splits) == 1 and len(levels) == 1 and not levels[0].get("use_regex", True):
            regex = splits[0].get("pattern", {}).get("Regex")
            if regex in _KNOWN_SPLITS:
                return _KNOWN_SPLITS[regex]
        if len(parts) == 1:
            return _pre_name(parts[0], where)
    raise UserError(f"{where}: pre-tokenizer {json.dumps(pre_tokenizer)[:120]} has no known "
                    "llama.cpp equivalent; llama.cpp would split text differently")


def _bpe_vocab(file: Path, n_vocab: int) -> Vocab:
    if not file.exists():
        raise UserError(f"{file.parent}: tokenizer.json not found")
    data = json.loads(file.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{file}: tokenizer model '{model.get('type')}' is not supported "
                        "(byte-level BPE or SentencePiece only)")
    decoder = (data.get("decoder") or {}).get("type")
    if decoder != "ByteLevel":
        raise UserError(f"{file}: BPE tokenizer without a ByteLevel decoder is not supported")
    pre = _pre_name(data.get("pre_tokenizer"), file)
    tokens = {int(i): t for t, i in model["vocab"].items()}
    types = {}
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise UserError(f"{file}: BPE tokenizer has no merges")
    token_list, type_list = _pad(tokens, types, n_vocab, file)
    return Vocab("gpt2", pre, token_list, type_list, merges, None)


def _sentencepiece_vocab(file: Path, n_vocab: int) -> Vocab:
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(file.read_bytes())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise UserError(f"{file}: only BPE SentencePiece models are supported (llama.cpp's "
                        "'llama' tokenizer merges by score; a unigram model would tokenize "
                        "differently)")
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces:
        raise UserError(f"{file}: SentencePiece normalizer '{norm.name}' (remove_extra_whitespaces="
                        f"{norm.remove_extra_whitespaces}) is not applied by llama.cpp, which "
                        "would tokenize differently")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
    tokens, types, scores = {}, {}, {}
    for i in range(sp.vocab_size()):
        tokens[i] = sp.id_to_piece(i)
        scores[i] = sp.get_score(i)
        types[i] = (UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i)
                    else UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    token_list, type_list = _pad(tokens, types, n_vocab, file)
    score_list = [scores.get(i, -1000.0) for i in range(n_vocab)]
    specials = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    return Vocab("llama", None, token_list, type_list, [], score_list,
                 add_space_prefix=proto.normalizer_spec.add_dummy_prefix,
                 specials={k: v for k, v in specials.items() if v >= 0})


def add_to_writer(writer, vocab: Vocab, tok: ir.Tokenizer | None, arch: str, n_vocab: int) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.model == "none":
        writer.add_uint32(f"{arch}.vocab_size", n_vocab)
        return
    writer.add_vocab_size(n_vocab)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    ids = {**vocab.specials, **{k: v for k, v in (("bos", tok.bos_id), ("eos", tok.eos_id),
                                                   ("pad", tok.pad_id)) if v is not None}}
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "pad": writer.add_pad_token_id, "unk": writer.add_unk_token_id}
    for name, value in ids.items():
        setters[name](int(value))
    writer.add_add_bos_token(bool(tok.add_bos))
