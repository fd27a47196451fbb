"""An lm-evaluation-harness model over every file moecompile writes.

lm-eval's own GGUF model only talks HTTP to a server (no rolling log-likelihood, and it breaks
against current llama-server), and its `hf` model with `gguf_file=` dequantizes into torch, so
llama.cpp never runs (research digest shared/research/lm-eval.md §1, §9). `MoeLM` wraps an
evaluation Backend instead: a Hugging Face folder in transformers, a `.gguf` in llama.cpp in
this process, an `.onnx` in ONNX Runtime, each as a user runs it, so the harness's own task
definitions score the compiled file itself.

Importing this module imports lm_eval (an optional extra): import it only when asked to run the
harness (benchmarks.py does, after checking that lm_eval is installed).

Conventions, those of lm-eval's `hf` model unless said otherwise:
- a context is tokenized with BOS in front where the model's tokenizer adds one by default
  (Backend.add_bos); an empty context becomes the prefix token (BOS, else EOS);
- `loglikelihood_rolling` scores a whole text in disjoint windows of `max_length` tokens, the
  first conditioned on the prefix token, the text itself encoded without BOS (the `hf` model
  encodes it with BOS and then prepends the prefix token as well, scoring BOS once more);
- `generate_until` is greedy only (a task that asks for sampling is refused), stops at EOS, at
  `max_gen_toks` (256 by default) and at the first of the `until` strings (llama.cpp and
  transformers stop generating there; the ONNX decoder generates on to `max_gen_toks`, and
  the text is cut all the same).
"""

from __future__ import annotations

import json

from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..errors import UserError
from .backends import Backend
from .loglik import continuation_logprobs

DEFAULT_MAX_GEN_TOKS = 256


class MoeLM(TemplateLM):
    """lm-eval's model interface over a moecompile evaluation Backend."""

    def __init__(self, backend: Backend, batch_size: int = 8):
        super().__init__()
        self.backend = backend
        self.batch_size = batch_size

    @property
    def eot_token_id(self) -> int:
        return self.backend.eos

    @property
    def prefix_token_id(self) -> int:
        return self.backend.bos if self.backend.bos is not None else self.backend.eos

    @property
    def max_length(self) -> int:
        return self.backend.context

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        ids = self.backend.encode(string)
        bos = self.backend.bos
        wanted = self.backend.add_bos if add_special_tokens is None else add_special_tokens
        if wanted and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # no per-call progress bar

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        return continuation_logprobs(self.backend, [(ctx, cont) for _, ctx, cont in requests],
                                     self.max_length, self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, continuation_logprobs(
                self.backend, windows, self.max_length, self.batch_size)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}  # requests with the same generation settings
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until, max_new = _generation_settings(kwargs, self.backend.decode([self.eot_token_id])
                                                  if self.eot_token_id is not None else None)
            keep = max(1, self.max_length - max_new)
            prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in indices]
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                news = self.backend.greedy(prompts[start:start + self.batch_size], max_new,
                                           stop=[u for u in until if u])
                for i, new in zip(chunk, news):
                    out[i] = _cut(self.backend.decode(new), until)
        return out


def _generation_settings(kwargs: dict, eos_text: str | None) -> tuple[list[str], int]:
    """The stop strings and token budget of a task's generation_kwargs; sampling is refused."""
    if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
        raise UserError("the task asks for sampled generation (do_sample/temperature); "
                        "moecompile's lm-eval model generates greedily only")
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    if eos_text and eos_text not in until:
        until.append(eos_text)
    return until, int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))


def _cut(text: str, until: list[str]) -> str:
    """The text up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
