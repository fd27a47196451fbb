"""The layer-major ("streaming") reference executor: the only way to run a 7–47 B MoE here.

The token-major executor (executor.py) keeps every weight it has touched as float32: fine for
the bundled model, 4–6x a checkpoint's bf16 size for a real one. This one swaps the loops, as
every tool that calibrates real MoEs does (llm-compressor's sequential pipeline, GPTQModel,
ExLlamaV2; shared/research/scale.md §1):

    for block: for sequences: ...        instead of        for sequences: for block: ...

- one block's weights are resident at a time, and of its experts one at a time: each is
  fetched (through the numerics, in float32) when its turn comes and dropped after, so peak
  memory follows the largest expert and attention, not the model;
- the whole calibration set's hidden states are carried from block to block (T x hidden
  float32: 134 MB for 16 k tokens of a 2048-wide model);
- attention runs in batches of sequences; the FFN runs on all real tokens at once, expert by
  expert, so each expert's weights are read once per pass (padding never reaches an FFN);
- while a block computes, the kernel is asked to read the next block's bytes (posix_fadvise);
- observers (moecompile/analysis/observers.py) see every matmul input of real tokens, each
  MoE layer's routing and each expert's output, and each block's input and output, so one pass
  gathers every statistic the passes need.

It computes the same numbers as the token-major executor at every real token (the tests hold
it there on every family, with the verification numerics too); it subclasses it, so the
block arithmetic and the routing are written once.
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from tqdm import tqdm

from .. import ir
from .executor import Numerics, ReferenceExecutor, SourceNumerics
from .resume import Resume

SEQUENCE_BATCH = 8  # sequences per attention batch
HEAD_ROWS = 2048  # tokens per output-head chunk (vocab x rows float32 logits at a time)
# float32 weight bytes above which passes and verification stream (MOECOMPILE_STREAM_ABOVE
# sets it: 0 streams every model, e.g. on a machine with little memory)
STREAM_ABOVE = int(os.environ.get("MOECOMPILE_STREAM_ABOVE", 2 * 2**30))
_ADVISER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moecompile-readahead")


def HEAD_INPUT(rows: torch.Tensor, logits: torch.Tensor) -> None:
    """`StreamingExecutor.run(head=HEAD_INPUT)`: show observers the output head's input (a
    matmul input like any other), compute no logits."""


def float32_bytes(model: ir.Model) -> int:
    """What the token-major executor would hold for `model`: every weight as float32."""
    return 4 * sum(t.numel for _, t in model.tensors())


def streams(model: ir.Model) -> bool:
    """Is `model` too large to run token-major (every weight held as float32)?"""
    return float32_bytes(model) > STREAM_ABOVE


def executor_for(model: ir.Model, device: str | None = None, numerics: Numerics | None = None,
                 jitter: tuple[float, int] | None = None):
    """The token-major executor for a model that fits comfortably, else the streaming one."""
    if streams(model):
        return StreamingExecutor(model, device, numerics, jitter=jitter)
    return ReferenceExecutor(model, device, numerics, jitter)


class Observer:
    """What a pass measures during a streaming pass. Every method is optional; rows are real
    tokens only. Subclasses keep sums, so states of token shards merge by addition."""

    def part(self, rows: list[int]) -> "Observer":
        """A copy for the token shard of the calibration examples `rows` (a contiguous run,
        analysis/shards.py), made before the pass while the sums are still empty; `merge` adds
        its sums back. Observers that index tokens by their place in the whole set override
        it."""
        return copy.deepcopy(self)

    def input(self, path: str, x: torch.Tensor) -> None:
        """x (rows, in): the input of the matmul with the weight at `path`."""

    def routing(self, block: int, x, logits, idx, weights) -> None:
        """Block's MoE: its input x (N, D), router logits (N, R), chosen experts and weights."""

    def expert(self, block: int, e: int, rows, out, weights, idx) -> None:
        """Expert e's output `out` on the tokens `rows` routed to it."""

    def block(self, block: int, h_in, h_mid, h_out) -> None:
        """A block's input, its state after attention, and its output (N, D)."""

    def attach(self, executor: "StreamingExecutor") -> None:
        """The executor feeding this observer (for an observer that needs its weights)."""

    def state(self) -> dict:
        """What this observer has summed so far (to save a pass's progress)."""
        return {k: v for k, v in vars(self).items() if k not in self.transient}

    def load_state(self, state: dict) -> None:
        vars(self).update(state)

    transient = ("executor", "_layer", "observers")  # references, not sums


class _Observed:
    """Numerics that show each matmul input of real tokens to an observer."""

    def __init__(self, inner: Numerics, executor: "StreamingExecutor"):
        self.inner, self.ex = inner, executor
        self.exact = inner.exact
        self._shown: tuple | None = None  # (input, real rows, what the observer was shown)

    def weight(self, path: str, tensor: ir.Tensor) -> torch.Tensor:
        return self.inner.weight(path, tensor)

    def input(self, path: str, x: torch.Tensor) -> torch.Tensor:
        real = self.ex.real_rows
        # products that share an input (q, k, v; gate, up) show the observer one tensor, so
        # what it derives from the input it can derive once
        if self._shown is None or self._shown[0] is not x or self._shown[1] is not real:
            rows = x.reshape(-1, x.shape[-1])
            self._shown = (x, real, rows if real is None else rows[real])
        self.ex.observer.input(path, self._shown[2])
        return self.inner.input(path, x)


class StreamingExecutor(ReferenceExecutor):
    def __init__(self, model: ir.Model, device: str | None = None,
                 numerics: Numerics | None = None, observer: Observer | None = None,
                 sequence_batch: int = SEQUENCE_BATCH, prefetch: bool = True,
                 progress: str | None = None, jitter: tuple[float, int] | None = None):
        super().__init__(model, device, numerics or SourceNumerics(), jitter)
        self.observer = observer or Observer()
        if observer is not None:
            self.numerics = _Observed(self.numerics, self)
            observer.attach(self)
        self.sequence_batch = sequence_batch
        self.prefetch = prefetch
        self.progress = progress  # a description shows a progress bar over the blocks
        self.real_rows: torch.Tensor | None = None  # which rows of a matmul input are real
        self.blocks_run = 0  # blocks computed by this executor (a resumed pass skips some)

    # ------------------------------------------------------------------ weights
    def w(self, path: str) -> torch.Tensor | None:
        """Experts' weights are fetched for each use and dropped; the rest is cached until
        the block is done (`release`)."""
        if ".experts." not in path:
            return super().w(path)
        tensor = self.tensors.get(path)
        return None if tensor is None else self.numerics.weight(path, tensor).to(
            device=self.device, dtype=torch.float32)

    def release(self) -> None:
        self._cache.clear()

    def advise(self, i: int) -> None:
        """Ask the kernel to read block i's checkpoint bytes ahead of their use, from another
        thread: the advice itself waits for the disk when the bytes are not cached (5 s of a
        16-layer OLMoE pass read from a cold cache)."""
        if not self.prefetch or i >= len(self.model.blocks):
            return
        prefix = f"blocks.{i}."
        infos = [info for path, tensor in self.tensors.items() if path.startswith(prefix)
                 for info in _loads(tensor)]
        _ADVISER.submit(lambda: [info.advise() for info in infos])

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), computed layer-major; rows of padded positions are left zero."""
        ids = torch.as_tensor(ids)
        ids = ids[None] if ids.dim() == 1 else ids
        out = torch.zeros(*ids.shape, self.model.vocab, dtype=torch.float32, device=self.device)

        def keep(rows: torch.Tensor, logits: torch.Tensor) -> None:
            out.view(-1, self.model.vocab)[rows] = logits

        self.run(ids, attention_mask, keep)
        return out

    @torch.no_grad()
    def run(self, ids: torch.Tensor, attention_mask: torch.Tensor | None,
            head: Callable[[torch.Tensor, torch.Tensor], None] | None,
            resume: "Resume | None" = None) -> torch.Tensor:
        """Run the model over every sequence, block by block. `head(rows, logits)` receives
        the logits of real tokens in chunks (`rows`: their indices in the flattened (B*T)
        batch); with `head=HEAD_INPUT` the observer is shown the head's input and no logits
        are computed (the head is 2.7 s of a 16-layer OLMoE calibration pass); without it
        the head is not run. With `resume` (runtime/resume.py) the state after each block is
        saved, and a saved state is continued from. Returns the final hidden states (B, T, D)."""
        ids = torch.as_tensor(ids, device=self.device)
        ids = ids[None] if ids.dim() == 1 else ids
        h, mask, positions = self.embed(ids, attention_mask)
        real, rows, padded = self.layout(ids, attention_mask)
        self.release()
        start = 0
        saved = resume.load() if resume is not None else None
        if saved is not None:
            h, start = saved["h"].to(self.device), saved["next"]
            self.observer.load_state(saved["observer"])
        bar = tqdm(total=len(self.model.blocks), initial=start, desc=self.progress, unit="block",
                   disable=self.progress is None)
        for i in range(start, len(self.model.blocks)):
            self.advise(i + 1)
            after = self.attend(i, h, mask, positions, real)
            h_in, h_mid = (real_states(z, rows, padded) for z in (h, after))
            h_out = self.ffn_residual(i, h_mid)
            self.observer.block(i, h_in, h_mid, h_out)
            h = with_ffn(after, h_out, rows, padded, in_place=True)
            self.release()
            self.blocks_run += 1
            bar.update(1)
            if resume is not None:
                resume.save({"h": h.cpu(), "next": i + 1, "observer": self.observer.state()})
        bar.close()
        if head is not None:
            self.run_head(h, rows, head)
            self.release()
        if resume is not None:
            resume.done()
        return h

    def run_head(self, h: torch.Tensor, rows: torch.Tensor,
                 head: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """The output head on the final states h (B, T, D) at the real tokens `rows`, in
        chunks of HEAD_ROWS: `head(rows, logits)` (see `run`)."""
        flat = h.reshape(-1, h.shape[-1])
        for start in range(0, len(rows), HEAD_ROWS):
            chunk = rows[start:start + HEAD_ROWS]
            normed = self.norm(flat[chunk], "final_norm")
            if head is HEAD_INPUT:
                self.numerics.input("lm_head", normed)
            else:
                head(chunk, self.linear(normed, "lm_head"))

    def layout(self, ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """(real, rows, padded): which positions (B, T) are real tokens, their rows in the
        flattened states, gathered by index (a boolean mask is slower), and whether any
        position is padding (without, blocks pass states on without a copy)."""
        real = (torch.ones(ids.shape, dtype=torch.bool, device=self.device)
                if attention_mask is None else torch.as_tensor(attention_mask).bool().to(self.device))
        rows = real.reshape(-1).nonzero(as_tuple=True)[0]
        return real, rows, len(rows) < real.numel()

    def attend(self, i: int, h: torch.Tensor, mask, positions, real: torch.Tensor) -> torch.Tensor:
        """Block i's first half on states h (B, T, D), in batches of sequences; a new tensor,
        so h stays as it was. `real` (B, T): which positions are real tokens."""
        after = torch.empty_like(h)
        b = self.sequence_batch
        for s in range(0, h.shape[0], b):
            self.real_rows = real[s:s + b].reshape(-1)
            after[s:s + b] = self.attention_residual(i, h[s:s + b], mask[s:s + b],
                                                     positions[s:s + b])
        self.real_rows = None
        return after

    def embed(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """As the token-major executor, but the embedding table is dropped after the lookup."""
        out = super().embed(ids, attention_mask)
        self._cache.pop("embed", None)
        return out

    def observe_routing(self, i, x, logits, idx, weights) -> None:
        self.observer.routing(i, x, logits, idx, weights)

    def observe_expert(self, i, e, rows, out, weights, idx) -> None:
        self.observer.expert(i, e, rows, out, weights, idx)


def real_states(h: torch.Tensor, rows: torch.Tensor, padded: bool) -> torch.Tensor:
    """The real tokens' states (N, D) of h (B, T, D): a view when there is no padding."""
    flat = h.view(-1, h.shape[-1])
    return flat.index_select(0, rows) if padded else flat


def with_ffn(after: torch.Tensor, h_out: torch.Tensor, rows: torch.Tensor, padded: bool,
             in_place: bool = False) -> torch.Tensor:
    """The block's output (B, T, D): the FFN's output at the real tokens `rows` (N, D) and
    the state after attention at padding (no FFN ever sees it). `in_place` writes into
    `after` (a pass of one model); otherwise it stays as it was (several candidates' FFNs
    follow one attention)."""
    if not padded:
        return h_out.view(after.shape)
    out = after if in_place else after.clone()
    out.view(-1, out.shape[-1]).index_copy_(0, rows, h_out)
    return out


def _loads(tensor: ir.Tensor):
    """The checkpoint tensors (TensorInfo) an IR tensor's recipe reads."""
    recipe = tensor.recipe
    if isinstance(recipe, ir.Load):
        info = getattr(recipe.source, "info", None)
        if info is not None:
            yield info(recipe.key)
        return
    for attr in ("base", "parts"):
        inner = getattr(recipe, attr, None)
        for t in (inner if isinstance(inner, tuple) else (inner,) if inner is not None else ()):
            yield from _loads(t)
