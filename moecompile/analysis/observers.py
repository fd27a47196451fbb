"""Statistics gathered in one streaming pass (runtime/streaming.py), each a sum over tokens.

Every observer keeps sums and counts only, so the states of token shards (a resumed pass, a
second worker) merge by addition (`merge`), exactly where the order of additions does not
matter and to float tolerance otherwise — the property llm-compressor's DDP all-reduce and
llama-imatrix's `--in-file` merging rely on (shared/research/scale.md §4, §6.4).

- `ImportanceObserver`: the importance matrix (mean squared input per column) of chosen
  weights, per expert; experts calibration rarely reaches are topped up with the tokens whose
  router logit for them is highest, counted apart so routed statistics stay unbiased;
- `RouterObserver`: per MoE layer and expert, how often it is in a token's top-k (frequency),
  its summed router probability (mass), and REAP's saliency: the mean over its tokens of
  router weight x output norm (Lasby et al., "REAP", Cerebras 2025);
- `SimilarityObserver`: each block's and each MoE sublayer's cosine between input and output
  (the unified compression framework's trimming criteria).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecompile.runtime.streaming import Observer

MIN_TOKENS = 64  # an expert with fewer routed tokens in a pass is topped up / reported


class Observers(Observer):
    """Several observers fed by one pass."""

    def __init__(self, *observers: Observer):
        self.observers = observers

    def input(self, path, x):
        for o in self.observers:
            o.input(path, x)

    def routing(self, block, x, logits, idx, weights):
        for o in self.observers:
            o.routing(block, x, logits, idx, weights)

    def expert(self, block, e, rows, out, weights, idx):
        for o in self.observers:
            o.expert(block, e, rows, out, weights, idx)

    def block(self, block, h_in, h_mid, h_out):
        for o in self.observers:
            o.block(block, h_in, h_mid, h_out)

    def attach(self, executor):
        for o in self.observers:
            o.attach(executor)

    def part(self, rows: list[int]) -> "Observers":
        return Observers(*(o.part(rows) for o in self.observers))

    def merge(self, other: "Observers") -> "Observers":
        for mine, theirs in zip(self.observers, other.observers):
            mine.merge(theirs)
        return self

    def state(self) -> dict:
        return {"observers": [o.state() for o in self.observers]}

    def load_state(self, state: dict) -> None:
        for o, s in zip(self.observers, state["observers"]):
            o.load_state(s)


def _add(into: dict, key, value) -> None:
    into[key] = into[key] + value if key in into else value


class ImportanceObserver(Observer):
    """Σ x_j² and the token count of each input column of the weights at `paths`.

    Experts that fewer than `min_tokens` routed tokens reached are topped up after the pass
    (`top_up`), when it is known which they are: a shard of the calibration set keeps, for
    each expert rare in it, the inputs of its `min_tokens` tokens with the highest router
    logits (an expert rare in the whole set is rare in every shard, and the whole set's best
    candidates are among the shards' best), so merged shards top up exactly the experts and
    tokens one pass over everything would."""

    def __init__(self, paths: set[str], min_tokens: int = MIN_TOKENS):
        self.paths, self.min_tokens = paths, min_tokens
        self.executor = None
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.topped_up: dict[str, int] = {}  # path -> tokens added for a rarely routed expert
        self.tokens: dict[int, int] = {}  # MoE block -> tokens seen
        # (block, expert) -> (router logits, inputs) of the expert's top-up candidates
        self.candidates: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._layer: tuple | None = None
        self._squares: tuple | None = None  # (the last input, its column sums of squares, rows)

    def input(self, path, x):
        if path in self.paths and x.numel():
            # q, k and v share one input, gate and up another: square it once (the executor
            # shows the same tensor for each; the sums are never updated in place)
            if self._squares is None or self._squares[0] is not x:
                # squared in place in a float64 copy: pow's result would be a second one
                flat = x.reshape(-1, x.shape[-1]).to(torch.float64, copy=True).square_()
                self._squares = (x, flat.sum(0).cpu(), flat.shape[0])
            _, squares, n = self._squares
            _add(self.sums, path, squares)
            self.counts[path] = self.counts.get(path, 0) + n

    def attach(self, executor):
        self.executor = executor
        self._squares = None  # an input of the last pass is not sent back with the sums

    def routing(self, block, x, logits, idx, weights):
        self._layer = (block, x, logits)

    def block(self, block, h_in, h_mid, h_out):
        """Keep the top-up candidates of the layer's experts that fewer than `min_tokens`
        tokens of this pass reached."""
        if self._layer is None or self._layer[0] != block:
            return
        _, x, logits = self._layer
        self._layer = None
        self.tokens[block] = self.tokens.get(block, 0) + x.shape[0]
        for e in range(logits.shape[-1]):
            prefix = f"blocks.{block}.ffn.experts.{e}"
            if (f"{prefix}.gate" not in self.paths
                    or self.counts.get(f"{prefix}.gate", 0) >= self.min_tokens):
                continue
            top = logits[:, e].topk(min(self.min_tokens, x.shape[0]))
            self._keep(block, e, top.values.cpu(), x[top.indices].cpu())

    def _keep(self, block: int, e: int, logits: torch.Tensor, xs: torch.Tensor) -> None:
        if (block, e) in self.candidates:  # two shards' candidates: the best of both
            have_logits, have_xs = self.candidates[(block, e)]
            logits, xs = torch.cat([have_logits, logits]), torch.cat([have_xs, xs])
            order = logits.topk(min(self.min_tokens, len(logits))).indices
            logits, xs = logits[order], xs[order]
        self.candidates[(block, e)] = (logits, xs)

    def top_up(self, executor) -> "ImportanceObserver":
        """After the pass (and the merge of shards): the experts still under `min_tokens`
        routed tokens get their candidates through them, counted apart so routed statistics
        stay unbiased. `executor` fetches the experts' weights."""
        for (block, e), (_, xs) in sorted(self.candidates.items()):
            prefix = f"blocks.{block}.ffn.experts.{e}"
            if self.counts.get(f"{prefix}.gate", 0) >= self.min_tokens:
                continue
            xs = xs[:min(self.min_tokens, self.tokens[block])].to(executor.device)
            take = xs.shape[0]
            act = F.silu(xs @ executor.w(f"{prefix}.gate").T) * (xs @ executor.w(f"{prefix}.up").T)
            for name, inp in (("gate", xs), ("up", xs), ("down", act)):
                path = f"{prefix}.{name}"
                _add(self.sums, path, inp.double().pow(2).sum(0).cpu())
                self.counts[path] = self.counts.get(path, 0) + take
                self.topped_up[path] = self.topped_up.get(path, 0) + take
        self.candidates = {}
        return self

    transient = Observer.transient + ("_squares",)

    def merge(self, other: "ImportanceObserver") -> "ImportanceObserver":
        for path, value in other.sums.items():
            _add(self.sums, path, value)
        for source, into in ((other.counts, self.counts), (other.topped_up, self.topped_up),
                             (other.tokens, self.tokens)):
            for key, n in source.items():
                into[key] = into.get(key, 0) + n
        for (block, e), (logits, xs) in other.candidates.items():
            self._keep(block, e, logits, xs)
        return self


class RouterObserver(Observer):
    """Per MoE layer: frequency, router mass, REAP saliency sums and routed tokens per expert."""

    def __init__(self):
        self.frequency: dict[int, torch.Tensor] = {}
        self.mass: dict[int, torch.Tensor] = {}
        self.reap: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}

    def routing(self, block, x, logits, idx, weights):
        n = logits.shape[-1]
        _add(self.frequency, block, torch.bincount(idx.reshape(-1), minlength=n).double().cpu())
        _add(self.mass, block, torch.softmax(logits, -1).double().sum(0).cpu())
        self.tokens[block] = self.tokens.get(block, 0) + x.shape[0]

    def expert(self, block, e, rows, out, weights, idx):
        gate = (weights[rows] * (idx[rows] == e)).sum(-1).double()
        saliency = float((gate * out.double().norm(dim=-1)).sum())
        n = self.frequency[block].shape[0]
        add = torch.zeros(n, dtype=torch.float64)
        add[e] = saliency
        _add(self.reap, block, add)

    def saliency(self, block: int) -> torch.Tensor:
        """REAP: mean router weight x output norm over each expert's routed tokens (0 where
        none reached it)."""
        routed = self.frequency[block]
        total = self.reap.get(block, torch.zeros_like(routed))
        return torch.where(routed > 0, total / routed.clamp(min=1), torch.zeros_like(total))

    def coverage(self, min_tokens: int = MIN_TOKENS) -> dict:
        """Routed tokens per expert, and the experts under `min_tokens` (layer -> experts)."""
        rare = {str(b): [e for e, c in enumerate(f.tolist()) if c < min_tokens]
                for b, f in self.frequency.items()}
        return {"min_tokens": min_tokens,
                "least_routed": min((int(f.min()) for f in self.frequency.values()), default=0),
                "rare": {b: es for b, es in rare.items() if es}}

    def merge(self, other: "RouterObserver") -> "RouterObserver":
        for mine, theirs in ((self.frequency, other.frequency), (self.mass, other.mass),
                             (self.reap, other.reap)):
            for block, value in theirs.items():
                _add(mine, block, value)
        for block, n in other.tokens.items():
            self.tokens[block] = self.tokens.get(block, 0) + n
        return self


class SimilarityObserver(Observer):
    """Σ cos(block input, block output) and Σ cos(x', x' + MoE(norm(x'))) over tokens."""

    def __init__(self, model):
        from moecompile import ir

        self.moe_blocks = {i for i, b in enumerate(model.blocks) if isinstance(b.ffn, ir.MoE)}
        self.block_sum: dict[int, float] = {}
        self.layer_sum: dict[int, float] = {}
        self.count: dict[int, int] = {}

    def block(self, block, h_in, h_mid, h_out):
        _add(self.block_sum, block, float(F.cosine_similarity(h_in, h_out, dim=-1).double().sum()))
        if block in self.moe_blocks:
            _add(self.layer_sum, block,
                 float(F.cosine_similarity(h_mid, h_out, dim=-1).double().sum()))
        self.count[block] = self.count.get(block, 0) + h_in.shape[0]

    def similarities(self) -> tuple[list[float], list[float | None]]:
        n = len(self.count)
        blocks = [self.block_sum[i] / self.count[i] for i in range(n)]
        layers = [self.layer_sum[i] / self.count[i] if i in self.layer_sum else None
                  for i in range(n)]
        return blocks, layers

    def merge(self, other: "SimilarityObserver") -> "SimilarityObserver":
        for mine, theirs in ((self.block_sum, other.block_sum), (self.layer_sum, other.layer_sum),
                             (self.count, other.count)):
            for block, value in theirs.items():
                _add(mine, block, value)
        return self
