"""One interface over the runtimes a compiled model can live in, for measuring it.

A Hugging Face folder runs in transformers (the model as its authors define it); a `.gguf`
runs in llama.cpp through llama-cpp-python, with its own tokenizer, exactly as a user would run
it; an `.onnx` runs in ONNX Runtime with the tokenizer files and genai_config.json moecompile
writes beside it, generating through its KV cache. Each gives: tokenization, full-sequence
logits and greedy completion, plus the two facts about the start of a text that scoring needs
to agree across runtimes: the BOS token (`bos`, None where the model has none) and whether its
tokenizer puts it in front of a text by default (`add_bos`: Llama/Mistral-style tokenizers do,
Qwen's and OLMoE's do not). `encode` itself never adds special tokens.

A Hugging Face folder is loaded in float32 whatever dtype it is stored in: it is the reference
the compiled file is compared with, bf16/f16 weights widen to float32 exactly, and computing in
float32 keeps rounding of bf16 activations out of what is reported as the cost of compression
(the price is twice the memory of a bf16 checkpoint; `memory.check_hf_fits` refuses a folder
that would not fit before anything is loaded).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..runtime.llama_worker import open_llama, sequence_logits


class Backend:
    name: str
    runtime: str  # what runs it, for reports: "transformers (float32)", "llama.cpp", ...
    vocab: int
    context: int
    eos: int | None = None
    bos: int | None = None
    add_bos: bool = False

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def logits(self, batch: list[list[int]]) -> list[np.ndarray]:
        """float32 logits (len, vocab) for each sequence; row t predicts token t+1."""
        raise NotImplementedError

    def greedy(self, prompts: list[list[int]], max_new: int,
               stop: list[str] | None = None) -> list[list[int]]:
        """Greedy continuations (at most max_new tokens each, stopping at end-of-sequence).
        `stop`: strings after which a continuation may end early, to save time; the caller
        still cuts at them (backends that cannot stop early generate on to max_new)."""
        raise NotImplementedError


class HFBackend(Backend):
    runtime = "transformers (float32)"

    def __init__(self, folder: Path, device: str = "cpu", context: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = str(folder)
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        self.model.eval()
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.vocab = self.model.config.vocab_size
        self.context = min(self.model.config.max_position_embeddings, context or 1 << 62)
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.eos or 0)
        self.bos, self.add_bos = _hf_bos(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _padded(self, batch: list[list[int]]):
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, seq in enumerate(batch):  # left padding, so every sequence ends at the last column
            ids[i, width - len(seq):] = torch.tensor(seq)
            mask[i, width - len(seq):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def logits(self, batch: list[list[int]]) -> list[np.ndarray]:
        ids, mask = self._padded(batch)
        # positions count real tokens only (as in generate(), the IR executor and the ONNX
        # runner), so a left-padded sequence is computed like the same sequence alone
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask,
                         position_ids=positions).logits.float().cpu().numpy()
        return [out[i, out.shape[1] - len(seq):] for i, seq in enumerate(batch)]

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new: int,
               stop: list[str] | None = None) -> list[list[int]]:
        ids, mask = self._padded(prompts)
        extra = {"stop_strings": stop, "tokenizer": self.tok} if stop else {}
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                  do_sample=False, pad_token_id=self.pad, eos_token_id=self.eos,
                                  **extra)
        return [_until_eos(row[ids.shape[1]:].tolist(), self.eos) for row in out]


class IRBackend(Backend):
    """A model still in the IR (e.g. just pruned), run by the reference executor.

    Lets a benchmark measure many compressed variants without exporting each; greedy decoding
    recomputes the whole sequence per step (no KV cache), which is fine for short answers."""

    def __init__(self, model, device: str = "cpu"):
        from transformers import AutoTokenizer

        from ..runtime.executor import ReferenceExecutor

        if model.tokenizer is None:
            raise UserError(f"{model.source}: no tokenizer to evaluate with")
        self.name = f"{model.source} (IR)"
        self.runtime = "moecompile reference executor"
        self.ex = ReferenceExecutor(model, device)
        self.device = self.ex.device
        self.tok = AutoTokenizer.from_pretrained(str(model.tokenizer.path))
        self.vocab = model.vocab
        self.context = model.context_length
        self.eos = model.tokenizer.eos_id
        self.pad = model.tokenizer.pad_id if model.tokenizer.pad_id is not None else (self.eos or 0)
        self.bos, self.add_bos = _hf_bos(self.tok)

    encode = HFBackend.encode
    decode = HFBackend.decode
    _padded = HFBackend._padded

    def logits(self, batch: list[list[int]]) -> list[np.ndarray]:
        ids, mask = self._padded(batch)
        out = self.ex.logits(ids, mask).float().cpu().numpy()
        return [out[i, out.shape[1] - len(seq):] for i, seq in enumerate(batch)]

    def greedy(self, prompts: list[list[int]], max_new: int,
               stop: list[str] | None = None) -> list[list[int]]:
        ids, mask = self._padded(prompts)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=ids.device)
        for _ in range(max_new):
            nxt = self.ex.logits(ids, mask)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, (~done).long()[:, None]], 1)
            done |= nxt == self.eos
            if bool(done.all()):
                break
        width = max(len(p) for p in prompts)  # generated tokens start after the padded prompts
        return [_until_eos(row[width:].tolist(), self.eos) for row in ids]


class GGUFBackend(Backend):
    runtime = "llama.cpp"

    def __init__(self, file: Path, n_ctx: int = 1024):
        self.name = str(file)
        self.llm = open_llama(str(file), n_ctx)
        self.vocab = self.llm.n_vocab()
        self.context = n_ctx
        self.eos = self.llm.token_eos()
        bos = self.llm.token_bos()
        self.bos = bos if bos >= 0 else None
        # llama.cpp puts BOS in front exactly when the file's tokenizer.ggml.add_bos_token says so
        self.add_bos = self.bos is not None and self.llm.tokenize(
            b"a", add_bos=True, special=False)[:1] == [self.bos]

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def logits(self, batch: list[list[int]]) -> list[np.ndarray]:
        return [sequence_logits(self.llm, seq) for seq in batch]

    def greedy(self, prompts: list[list[int]], max_new: int,
               stop: list[str] | None = None) -> list[list[int]]:
        out = []
        for prompt in prompts:
            self.llm.reset()
            self.llm.eval(prompt)
            new: list[int] = []
            for _ in range(max_new):
                token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
                if token == self.eos:
                    break
                new.append(token)
                if stop and any(s in self.decode(new) for s in stop):
                    break
                self.llm.eval([token])
            out.append(new)
        return out


class ONNXBackend(Backend):
    runtime = "onnxruntime"

    def __init__(self, file: Path, device: str = "cpu", context: int | None = None):
        from transformers import AutoTokenizer

        from ..runtime.onnx_runner import OnnxDecoder

        config_file = file.parent / "genai_config.json"
        if not (file.parent / "tokenizer.json").exists() or not config_file.exists():
            raise UserError(f"{file}: no tokenizer.json/genai_config.json beside it (moecompile "
                            "writes them with the model)")
        config = json.loads(config_file.read_text())["model"]
        self.name = str(file)
        self.decoder = OnnxDecoder(file, device)
        self.tok = AutoTokenizer.from_pretrained(str(file.parent))
        self.vocab = self.decoder.vocab
        self.context = min(config["context_length"], context or 1 << 62)
        self.eos = config["eos_token_id"]
        self.pad = config["pad_token_id"]
        self.bos, self.add_bos = _hf_bos(self.tok)

    encode = HFBackend.encode
    decode = HFBackend.decode

    def logits(self, batch: list[list[int]]) -> list[np.ndarray]:
        return [self.decoder.sequence_logits(seq) for seq in batch]

    def greedy(self, prompts: list[list[int]], max_new: int,
               stop: list[str] | None = None) -> list[list[int]]:
        # the runtime's decoder has no stop strings: it generates on to max_new
        return self.decoder.greedy(prompts, max_new, self.eos, self.pad)


def _hf_bos(tok) -> tuple[int | None, bool]:
    """The BOS id of a transformers tokenizer, and whether encoding a text puts it in front."""
    bos = tok.bos_token_id
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bos, bos is not None and ids[:1] == [bos]


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


def gguf_context_length(path: Path) -> int | None:
    """The context length a .gguf was trained for (its metadata; no weights read): llama.cpp
    warns of an overflow when n_ctx exceeds it, and positions past it are untrained anyway."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        return int(reader.fields[f"{arch}.context_length"].parts[-1][0])
    except (KeyError, ValueError, IndexError, OSError):
        return None


def open_backend(path: str | Path, device: str = "cpu", context: int | None = None) -> Backend:
    """A backend for a HF checkpoint folder, a .gguf or an .onnx file. `context` caps the
    longest sequence it is given (for a .gguf it is llama.cpp's n_ctx, 1024 by default)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path}: not a Hugging Face checkpoint (no config.json)")
        return HFBackend(path, device, context)
    if path.suffix == ".gguf" and path.is_file():
        trained = gguf_context_length(path)
        return GGUFBackend(path, min(context or 1024, trained or 1 << 62))
    if path.suffix == ".onnx" and path.is_file():
        return ONNXBackend(path, device, context)
    raise UserError(f"{path}: expected a Hugging Face folder, a .gguf or an .onnx file")
