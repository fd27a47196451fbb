"""The simple expert-pruning methods EEP is compared with (and starts from).

All keep the same number of experts in every layer and decide from the original model's
behaviour on the calibration set (EEP paper, App. A.2; definitions in
shared/research/eep.md §6):

- random: a seeded uniform draw per layer;
- frequency: the experts most often among a token's top-k (SEER-MoE "actual counting");
- mass: the experts with the largest router probability summed over all tokens ("soft
  counting"; the all-tokens sum, the natural reading of the paper);
- reap: the experts with the largest REAP saliency, the mean over an expert's routed tokens of
  its router weight times its output's norm (Lasby et al., "REAP: Router-weighted Expert
  Activation Pruning", Cerebras 2025): an expert that is chosen often but contributes little
  goes first;
- reconstruct: per layer, the subset whose layer output best reconstructs the original
  output (NAEE, "Not All Experts are Equal"): every subset is tried (at most `MAX_SUBSETS`,
  sampled with the seed beyond that), scored by the sum over calibration examples of the
  Frobenius norm of the output difference, with inputs from the unpruned model (through the
  experts' Gram matrices, `subset_squares`; for a model that streams, in its one pass:
  `ReconstructionObserver`).
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from dataclasses import dataclass

import torch

from moecompile import ir
from moecompile.runtime.executor import (ReferenceExecutor, combine_experts, route,
                                         select_experts, swiglu)
from moecompile.runtime.streaming import Observer

from .calibration import CalibSet, spread_rows
from .expert_plan import LayerPlan, keep_plan, moe_layers
from .neurons import example_of_tokens, examples_of_shard
from .observers import _add

MAX_SUBSETS = 2000
BASELINES = ("random", "frequency", "mass", "reap", "reconstruct")
EEP_STARTS = ("random", "frequency", "mass", "reconstruct")  # the baselines EEP's search seeds from


@dataclass
class LayerIO:
    """One MoE layer's behaviour on the calibration tokens (padding removed)."""

    x: torch.Tensor  # (N, D) the MoE input
    y: torch.Tensor  # (N, D) the routed experts' output (shared expert excluded)
    logits: torch.Tensor  # (N, E) router logits
    probs: torch.Tensor  # (N, E) router softmax
    routed: torch.Tensor  # (N, k) the experts each token is routed to
    example: torch.Tensor  # (N,) which calibration example each token belongs to
    reap: torch.Tensor  # (E,) REAP saliency

    @property
    def frequency(self) -> torch.Tensor:
        return torch.bincount(self.routed.reshape(-1), minlength=self.logits.shape[-1]).double()

    @property
    def mass(self) -> torch.Tensor:
        return self.probs.double().sum(0)


@dataclass
class LayerStats:
    """What the streaming observers keep of a layer (analysis/observers.RouterObserver): enough
    for every baseline but reconstruct."""

    frequency: torch.Tensor
    mass: torch.Tensor
    reap: torch.Tensor


def stats_from(router) -> dict[int, LayerStats]:
    """Per-layer baseline statistics from a streaming pass's RouterObserver."""
    return {b: LayerStats(router.frequency[b], router.mass[b], router.saliency(b))
            for b in router.frequency}


@torch.no_grad()
def collect_layer_io(model: ir.Model, calib: CalibSet, device: str = "cpu") -> dict[int, LayerIO]:
    ex = ReferenceExecutor(model, device)
    mask = calib.mask.to(ex.device)
    h, attn_mask, positions = ex.embed(calib.ids.to(ex.device), mask)
    keep = mask.reshape(-1).bool()
    example = torch.arange(calib.n_examples, device=ex.device)[:, None].expand_as(mask).reshape(-1)[keep]
    out: dict[int, LayerIO] = {}
    for i, block in enumerate(model.blocks):
        if not isinstance(block.ffn, ir.MoE):
            h = ex.block_forward(i, h, attn_mask, positions)
            continue
        h = ex.attention_residual(i, h, attn_mask, positions)
        moe = block.ffn
        x = ex.ffn_input(i, h).reshape(-1, h.shape[-1])
        logits = ex.router_logits(i, x)
        idx, weights = route(moe, logits)
        gate, up, down = ex.experts_stacked(i)
        saliency = torch.zeros(moe.n_experts, dtype=torch.float64)
        real = keep.nonzero(as_tuple=True)[0]

        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            y = swiglu(x[rows], gate[e], up[e], down[e])
            counted = torch.isin(rows, real)
            g = (weights[rows] * (idx[rows] == e)).sum(-1)
            saliency[e] = float((g * y.norm(dim=-1))[counted].double().sum())
            return y

        routed = combine_experts(x, idx, weights, expert)
        frequency = torch.bincount(idx[keep].reshape(-1), minlength=moe.n_experts).double()
        reap = torch.where(frequency > 0, saliency / frequency.clamp(min=1),
                           torch.zeros_like(saliency))
        out[i] = LayerIO(x[keep], routed[keep], logits[keep], torch.softmax(logits[keep], -1),
                         idx[keep], example, reap)
        shared = ex.shared_expert(i, x)
        h = h + (routed if shared is None else routed + shared).reshape(h.shape)
    return out


def choose(method: str, model: ir.Model, io: dict, n_keep: int,
           seed: int = 0, device: str = "cpu") -> dict[int, LayerPlan]:
    """One-hot plans (kept experts per MoE layer) by a baseline method, from each layer's
    LayerIO (token-major) or LayerStats (streaming; every method but reconstruct)."""
    plans: dict[int, LayerPlan] = {}
    rng = random.Random(f"random-prune/{seed}")
    ex = ReferenceExecutor(model, device) if method == "reconstruct" else None
    for layer in moe_layers(model):
        moe, layer_io = model.blocks[layer].ffn, io[layer]
        e = moe.n_experts
        if method == "random":
            kept = rng.sample(range(e), n_keep)
        elif method == "frequency":
            kept = _top(layer_io.frequency, n_keep)
        elif method == "mass":
            kept = _top(layer_io.mass, n_keep)
        elif method == "reap":
            kept = _top(layer_io.reap, n_keep)
        elif method == "reconstruct":
            kept = _best_reconstruction(ex, layer, moe, layer_io, n_keep, seed)
        else:
            raise ValueError(f"unknown baseline {method!r}")
        plans[layer] = keep_plan(kept, e)
    return plans


def _top(score: torch.Tensor, n: int) -> list[int]:
    # stable: ties go to the lower expert index
    order = sorted(range(len(score)), key=lambda i: (-float(score[i]), i))
    return order[:n]


def _subsets(e: int, n_keep: int, seed: int) -> list[list[int]]:
    """The subsets `reconstruct` tries in every layer: all of them, or MAX_SUBSETS drawn with
    the seed."""
    if math.comb(e, n_keep) <= MAX_SUBSETS:
        return [list(s) for s in itertools.combinations(range(e), n_keep)]
    rng = random.Random(f"reconstruct/{seed}")
    seen: set[tuple[int, ...]] = set()
    while len(seen) < MAX_SUBSETS:
        seen.add(tuple(sorted(rng.sample(range(e), n_keep))))
    return [list(s) for s in sorted(seen)]


def _best_reconstruction(ex: ReferenceExecutor, layer: int, moe: ir.MoE, io: LayerIO,
                         n_keep: int, seed: int) -> list[int]:
    subsets = _subsets(moe.n_experts, n_keep, seed)
    gate, up, down = ex.experts_stacked(layer)
    # every expert's output on every token, once (E, N, D)
    expert_out = torch.stack([swiglu(io.x, gate[j], up[j], down[j])
                              for j in range(moe.n_experts)])
    squares = subset_squares(moe, io.logits, expert_out, io.example, subsets,
                             int(io.example.max()) + 1)
    return _least_loss(subsets, squares)


GRAM_TOKENS = 64  # tokens whose experts' Gram matrices are formed at once (in float64)
SUBSET_BATCH = 32  # subsets scored at once


def subset_squares(moe: ir.MoE, logits: torch.Tensor, out: torch.Tensor, examples: torch.Tensor,
                   subsets: list[list[int]], n_examples: int) -> torch.Tensor:
    """(subsets, examples) float64: over each calibration example's tokens, the sum of
    ||y - y_S||^2, y the layer's routed output with every expert, y_S with only subset S (its
    router rows sliced, as the pruned model routes: the softmax over S's logits); `out`
    (E, N, D) holds every expert's output on every token, `examples` (N,) each token's
    example. Per token the error is a^T G a, G the Gram matrix of the experts' outputs
    (float64) and a the difference of the two routings' weights, so a subset costs
    O(N (E + k^2)) rather than O(N k D), `SUBSET_BATCH` at once: 2000 subsets of OLMoE's 64
    experts on 1024 tokens take seconds instead of the minute the outputs themselves took."""
    e, n = out.shape[0], out.shape[1]
    gram = torch.empty(n, e, e, dtype=torch.float64, device=out.device)
    for s in range(0, n, GRAM_TOKENS):
        o = out[:, s:s + GRAM_TOKENS].double().transpose(0, 1)  # (t, E, D)
        gram[s:s + GRAM_TOKENS] = o @ o.transpose(1, 2)
    # with a = a_all - a_S: a^T G a = a_all^T G a_all - 2 (G a_all)[S's experts] . w_S + the
    # k x k quadratic of S's own weights; the first two terms are formed once
    idx_all, w_all = route(moe, logits)
    a_all = torch.zeros(n, e, dtype=torch.float64, device=out.device)
    a_all.scatter_add_(1, idx_all, w_all.double())
    v = torch.einsum("nef,nf->ne", gram, a_all)
    c = (a_all * v).sum(-1)
    tokens = torch.arange(n, device=out.device)[None, :, None]
    squares = torch.zeros(len(subsets), n_examples, dtype=torch.float64)
    examples = examples.cpu()
    for first in range(0, len(subsets), SUBSET_BATCH):
        batch = subsets[first:first + SUBSET_BATCH]
        b = len(batch)
        keep = torch.zeros(b, e, dtype=torch.bool, device=out.device)
        keep[torch.arange(b)[:, None], torch.tensor(batch)] = True
        probs = torch.softmax(logits[None].masked_fill(~keep[:, None, :], float("-inf")), -1)
        idx, w = select_experts(probs, min(moe.top_k, len(batch[0])), moe.norm_topk)
        w = w.double()
        cross = (w * v[tokens, idx]).sum(-1)
        quad = (w[..., :, None] * gram[tokens[..., None], idx[..., :, None], idx[..., None, :]]
                * w[..., None, :]).sum((-2, -1))
        err = (c - 2 * cross + quad).clamp(min=0)  # (b, N)
        squares[first:first + b].index_add_(1, examples, err.cpu())
    return squares


def _least_loss(subsets: list[list[int]], squares: torch.Tensor) -> list[int]:
    """The subset with the least sum over examples of the Frobenius norm of its error (NAEE's
    loss; the first of equals)."""
    return subsets[int(torch.argmin(squares.sqrt().sum(-1)))]


class ReconstructionObserver(Observer):
    """`reconstruct` for a model that streams (runtime/streaming.py): during one layer-major
    pass of the original, each MoE layer's input (of examples holding `TOKENS` tokens, spread
    over the set: calibration.spread_rows) is run through every expert, `CHUNK_BYTES` of
    outputs at a time (the experts' weights are read once per chunk), and each candidate
    subset's squared output error is summed per calibration example (`subset_squares`) —
    sums, so token shards merge by addition. `best(layer)` then takes the subset the
    token-major search takes on those tokens: the same subsets, the same loss."""

    CHUNK_BYTES = 512 * 2**20  # every expert's output on a chunk of tokens, float32
    TOKENS = 1024  # at least this many tokens (examples spread over the set) are reconstructed

    def __init__(self, model: ir.Model, calib: CalibSet, n_keep: int, seed: int):
        self.layers = {i: model.blocks[i].ffn for i in moe_layers(model)}
        self.subsets = {i: _subsets(moe.n_experts, n_keep, seed) for i, moe in self.layers.items()}
        self.n_examples = calib.n_examples
        self.examples = example_of_tokens(calib)  # of each real token, in the whole set
        # every expert on every token costs E/k times the routed forward, and 2000 subsets are
        # scored on each (OLMoE, 4096 tokens: 50 of the 62 s a block took); examples holding
        # TOKENS tokens measure a layer's output error (all of a smaller set), spread over the
        # set (its first examples would be its first tasks only)
        self.measured = torch.zeros(calib.n_examples, dtype=torch.bool)
        self.measured[spread_rows(calib, self.TOKENS)] = True
        self.squares: dict[int, torch.Tensor] = {}  # layer -> (subsets, examples) float64
        self.executor = None

    def attach(self, executor) -> None:
        self.executor = executor

    def part(self, rows: list[int]) -> "ReconstructionObserver":
        out = copy.copy(self)
        out.squares, out.executor = {}, None
        out.examples = examples_of_shard(self.examples, rows)
        return out

    def routing(self, block, x, logits, idx, weights):
        if block not in self.layers or not x.shape[0]:
            return
        used = self.measured[self.examples]
        if not used.any():
            return
        if not used.all():
            x, logits = x[used.to(x.device)], logits[used.to(x.device)]
        examples = self.examples[used]
        moe, subsets = self.layers[block], self.subsets[block]
        e, w = moe.n_experts, self.executor.w
        prefix = f"blocks.{block}.ffn.experts"
        chunk = max(1, self.CHUNK_BYTES // (4 * e * x.shape[-1]))
        for start in range(0, x.shape[0], chunk):
            xs = x[start:start + chunk]
            out = torch.stack([swiglu(xs, w(f"{prefix}.{j}.gate"), w(f"{prefix}.{j}.up"),
                                      w(f"{prefix}.{j}.down")) for j in range(e)])
            add = subset_squares(moe, logits[start:start + chunk], out,
                                 examples[start:start + chunk], subsets, self.n_examples)
            _add(self.squares, block, add)

    def merge(self, other: "ReconstructionObserver") -> "ReconstructionObserver":
        for block, value in other.squares.items():
            _add(self.squares, block, value)
        return self

    def best(self, layer: int) -> list[int]:
        """The subset of `layer` with the least loss (the first of equals)."""
        squares = self.squares.get(layer)
        if squares is None:  # no calibration token: every subset reconstructs equally
            return self.subsets[layer][0]
        return _least_loss(self.subsets[layer], squares)

    transient = Observer.transient + ("examples", "layers", "subsets", "measured")
