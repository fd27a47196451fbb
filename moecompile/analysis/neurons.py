"""What expert slimming measures: how much each intermediate neuron of an MLP matters, and the
least-squares refit of a down projection onto the neurons it keeps.

An MLP (a routed expert, a shared expert, a dense layer) computes y = W a with
a = silu(gate x) * up x, W its down projection (hidden x F). Removing neuron j removes row j of
gate and up and column j of W. All statistics here are of `a` on the calibration tokens that
reach the MLP, each token weighted by the square of the weight its output is scaled by in the
layer output (the routing weight for a routed expert, the sigmoid gate for a gated shared
expert, 1 otherwise): the layer output's error is what slimming should keep small, and a token
that barely uses an expert barely feels its loss.

Importances (higher is kept), the Wanda-style score and its two factors as baselines:
- wanda: ||W[:, j]|| * rms(a_j) — the square root of the neuron's expected contribution to the
  output energy, cross terms left out (Wanda, arXiv 2306.11695, per output neuron);
- activation: rms(a_j) alone;
- weight: ||W[:, j]|| alone;
- random: a seeded draw (the floor every measured importance must beat).

The refit replaces W by W' (hidden x K) minimising E||W a - W' a_K||^2 + lam ||W' - W[:, K]||^2:
ridge towards the plain slice, so lam -> 0 is ordinary least squares and lam -> inf is no refit.
Solution: W' = W M, M = (S[:, K] + lam P)(S[K, K] + lam I)^-1 with S = E[a a^T] and P the
column selection. lam is chosen per MLP from a small grid (relative to the mean of diag S[K, K])
by the error on held-out calibration examples (odd examples when fitting on the even ones, and
the reverse, summed), then M is fitted on all of them. With few tokens per expert the plain
least-squares fit overfits; the hold-out lets the data say how much refit it supports, and
"no refit" is always one of the choices.

Statistics are collected one-shot on the model as it is (one forward of the calibration set):
token-major (`collect`), or for a model too large for that layer-major, by `NeuronObserver` fed
by the streaming executor (runtime/streaming.py) — the same sums from the same tokens. The
importances need only each neuron's mean square; the refit (and the plain slice's error)
need the F x F second moments, float64 in two halves: F^2 x 16 bytes per MLP — nothing at the
bundled model's F=256, 3 GiB per expert at Mixtral's 14336 (this module keeps all it is asked
for; the pass refuses a refit whose statistics would not fit, passes/slim_experts.py).
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moecompile import ir
from moecompile.runtime.executor import ReferenceExecutor, route
from moecompile.runtime.streaming import Observer

from .calibration import CalibSet

IMPORTANCES = ("wanda", "activation", "weight", "random")
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # x mean(diag S[K, K]); plus "no refit"


@dataclass
class NeuronStats:
    """Weighted second moments of one MLP's intermediate activations, kept in two halves
    (even / odd calibration examples) for the refit's hold-out: the diagonal always (what the
    importances need), the full F x F matrix only with `full` (what the refit needs)."""

    width: int
    full: bool = True
    diag: list[torch.Tensor] = field(default_factory=list)  # [half] (F,) float64: sum w a^2
    sums: list[torch.Tensor] = field(default_factory=list)  # [half] (F, F) float64: sum w a a^T
    weights: list[float] = field(default_factory=lambda: [0.0, 0.0])  # [half] sum of w
    tokens: int = 0

    def __post_init__(self):
        self.diag = [torch.zeros(self.width, dtype=torch.float64) for _ in range(2)]
        if self.full:
            self.sums = [torch.zeros(self.width, self.width, dtype=torch.float64)
                         for _ in range(2)]

    def add(self, a: torch.Tensor, w: torch.Tensor, half: torch.Tensor) -> None:
        a, w = a.double().cpu(), w.double().cpu()
        half = half.cpu()
        for h in (0, 1):
            rows = half == h
            if rows.any():
                aw = a[rows] * w[rows, None]
                self.diag[h] += (aw * a[rows]).sum(0)
                if self.full:
                    self.sums[h] += aw.T @ a[rows]
                self.weights[h] += float(w[rows].sum())
        self.tokens += a.shape[0]

    def merge(self, other: "NeuronStats") -> "NeuronStats":
        for h in (0, 1):
            self.diag[h] += other.diag[h]
            if self.full:
                self.sums[h] += other.sums[h]
            self.weights[h] += other.weights[h]
        self.tokens += other.tokens
        return self

    def second_moment(self, half: int | None = None) -> torch.Tensor | None:
        """E_w[a a^T] over one half (None: both); None when no token reached it."""
        assert self.full, "collected without the full second moment"
        halves = (0, 1) if half is None else (half,)
        total = sum(self.weights[h] for h in halves)
        if total <= 0:
            return None
        return sum(self.sums[h] for h in halves) / total

    def rms(self) -> torch.Tensor | None:
        total = sum(self.weights)
        if total <= 0:
            return None
        return ((self.diag[0] + self.diag[1]) / total).clamp(min=0).sqrt()


def mlp_paths(model: ir.Model, shared: bool) -> dict[str, ir.Expert]:
    """IR prefix -> MLP: every routed expert ("blocks.L.ffn.experts.E"), and with `shared`
    every shared expert and dense MLP."""
    out: dict[str, ir.Expert] = {}
    for i, b in enumerate(model.blocks):
        if isinstance(b.ffn, ir.MoE):
            for e, ex in enumerate(b.ffn.experts):
                out[f"blocks.{i}.ffn.experts.{e}"] = ex
            if shared and b.ffn.shared is not None:
                out[f"blocks.{i}.ffn.shared.mlp"] = b.ffn.shared.mlp
        elif shared and isinstance(b.ffn, ir.Dense):
            out[f"blocks.{i}.ffn.mlp"] = b.ffn.mlp
    return out


@torch.no_grad()
def collect(model: ir.Model, calib: CalibSet, prefixes: set[str], device: str = "cpu",
            full: bool = True) -> dict[str, NeuronStats]:
    """Statistics of the MLPs at `prefixes` over the calibration tokens (padding removed),
    from one forward of the model as it is; `full`: with the F x F second moments."""
    ex = ReferenceExecutor(model, device)
    mask = calib.mask.to(ex.device)
    h, attn_mask, positions = ex.embed(calib.ids.to(ex.device), mask)
    keep = mask.reshape(-1).bool()
    half = (torch.arange(calib.n_examples, device=ex.device)[:, None] % 2).expand_as(mask)
    half = half.reshape(-1)[keep]
    paths = mlp_paths(model, shared=True)
    stats = {p: NeuronStats(paths[p].width, full) for p in prefixes}

    def observe(prefix: str, x: torch.Tensor, w: torch.Tensor, which: torch.Tensor) -> None:
        if prefix in stats and x.shape[0]:
            a = F.silu(x @ ex.w(f"{prefix}.gate").T) * (x @ ex.w(f"{prefix}.up").T)
            stats[prefix].add(a, w, which)

    for i, block in enumerate(model.blocks):
        if block.ffn is None:
            h = ex.block_forward(i, h, attn_mask, positions)
            continue
        h = ex.attention_residual(i, h, attn_mask, positions)
        x = ex.ffn_input(i, h).reshape(-1, h.shape[-1])[keep]
        ffn = block.ffn
        if isinstance(ffn, ir.MoE):
            idx, weights = route(ffn, ex.router_logits(i, x), ex.router_map(i))
            for e in range(ffn.n_experts):
                rows, slot = (idx == e).nonzero(as_tuple=True)
                observe(f"blocks.{i}.ffn.experts.{e}", x[rows], weights[rows, slot] ** 2,
                        half[rows])
            if ffn.shared is not None:
                g = (torch.sigmoid(ex.linear(x, f"blocks.{i}.ffn.shared.gate"))[:, 0]
                     if ffn.shared.gate is not None else torch.ones(x.shape[0], device=x.device))
                observe(f"blocks.{i}.ffn.shared.mlp", x, g ** 2, half)
        else:
            observe(f"blocks.{i}.ffn.mlp", x, torch.ones(x.shape[0], device=x.device), half)
        h = ex.ffn_residual(i, h)
    return stats


def example_of_tokens(calib: CalibSet) -> torch.Tensor:
    """The calibration example of each real token, in the executors' order of real tokens
    (row-major, padding removed); its parity is the token's hold-out half."""
    mask = calib.mask.bool()
    return torch.arange(calib.n_examples)[:, None].expand_as(mask)[mask]


def examples_of_shard(examples: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Of `examples` (each real token's example in the whole set), those of a token shard made
    of the examples `rows`: the shard's tokens keep their place in the whole set."""
    return examples[torch.isin(examples, torch.tensor(rows))]


def statistics_bytes(model: ir.Model, prefixes, full: bool) -> int:
    """What the statistics of the MLPs at `prefixes` hold (float64, two halves)."""
    paths = mlp_paths(model, shared=True)
    return sum(16 * (paths[p].width ** 2 if full else paths[p].width) for p in prefixes)


class NeuronObserver(Observer):
    """`collect`'s statistics from a layer-major pass over the whole calibration set: each
    MLP's down-projection input is its activation `a`; a routed expert's tokens are weighted by
    their routing weight (known when the executor reports the expert's output), a gated shared
    expert's by its sigmoid gate (computed from the layer's input with the executor's weight
    at the end of the block), a dense MLP's by 1. The hold-out halves are the examples'
    parity in the whole set, also in a token shard's part (`part`), so merged shards keep the
    halves one pass over everything keeps."""

    def __init__(self, model: ir.Model, calib: CalibSet, prefixes: set[str], full: bool):
        paths = mlp_paths(model, shared=True)
        self.widths = {p: paths[p].width for p in prefixes}
        self.full = full
        # allocated on an MLP's first token: an unused copy (a shard's) costs nothing
        self.stats: dict[str, NeuronStats] = {}
        self.examples = example_of_tokens(calib)  # of each real token, in the whole set
        self.gated = {i for i, b in enumerate(model.blocks) if isinstance(b.ffn, ir.MoE)
                      and b.ffn.shared is not None and b.ffn.shared.gate is not None}
        self.executor = None
        self._layer: dict = {}  # this block's pending activations and MoE input (transient)

    def attach(self, executor) -> None:
        self.executor = executor

    def part(self, rows: list[int]) -> "NeuronObserver":
        """The shard of examples `rows`: its tokens keep their examples' halves."""
        out = copy.copy(self)
        out.stats, out._layer, out.executor = {}, {}, None
        out.examples = examples_of_shard(self.examples, rows)
        return out

    @property
    def half(self) -> torch.Tensor:
        """The hold-out half of each real token: its example's parity in the whole set."""
        return self.examples % 2

    def input(self, path, x):
        prefix = path.removesuffix(".down")
        if prefix == path or prefix not in self.widths or not x.shape[0]:
            return
        if ".ffn.experts." in prefix or prefix.endswith(".shared.mlp"):
            self._layer[prefix] = x  # weighted when the routing or the gate is known
        else:
            self._add(prefix, x, torch.ones(x.shape[0]), self.half)

    def _add(self, prefix: str, a, w, half) -> None:
        if prefix not in self.stats:
            self.stats[prefix] = NeuronStats(self.widths[prefix], self.full)
        self.stats[prefix].add(a, w, half)

    def routing(self, block, x, logits, idx, weights):
        self._layer["x"] = x

    def expert(self, block, e, rows, out, weights, idx):
        a = self._layer.pop(f"blocks.{block}.ffn.experts.{e}", None)
        if a is not None:
            w = (weights[rows] * (idx[rows] == e)).sum(-1)
            self._add(f"blocks.{block}.ffn.experts.{e}", a, w ** 2, self.half[rows.cpu()])

    def block(self, block, h_in, h_mid, h_out):
        prefix = f"blocks.{block}.ffn.shared.mlp"
        a = self._layer.pop(prefix, None)
        if a is not None:
            x = self._layer["x"]
            g = (torch.sigmoid(x @ self.executor.w(f"blocks.{block}.ffn.shared.gate").T)[:, 0]
                 if block in self.gated else torch.ones(x.shape[0], device=x.device))
            self._add(prefix, a, g ** 2, self.half)
        self._layer = {}

    def merge(self, other: "NeuronObserver") -> "NeuronObserver":
        for prefix, stats in other.stats.items():
            if prefix in self.stats:
                self.stats[prefix].merge(stats)
            else:
                self.stats[prefix] = stats
        return self

    def result(self) -> dict[str, NeuronStats]:
        """Every asked MLP's statistics, empty for one no calibration token reached (as
        `collect` gives them)."""
        return {p: self.stats.get(p) or NeuronStats(w, self.full) for p, w in self.widths.items()}

    transient = Observer.transient + ("examples", "gated", "widths", "full")


def importance(method: str, down: torch.Tensor, stats: NeuronStats | None,
               rng: random.Random) -> torch.Tensor:
    """One score per neuron (higher is kept). An MLP no calibration token reached has no
    activation statistics: its measured importances fall back to the weight's."""
    if method not in IMPORTANCES:
        raise ValueError(f"unknown importance {method!r}")
    width = down.shape[1]
    if method == "random":
        order = list(range(width))
        rng.shuffle(order)  # order[r]: the neuron ranked r-th
        scores = torch.empty(width, dtype=torch.float64)
        scores[torch.tensor(order)] = torch.arange(width, 0, -1, dtype=torch.float64)
        return scores
    norms = down.double().norm(dim=0).cpu()
    rms = stats.rms() if stats is not None else None
    if method == "weight" or rms is None:
        return norms
    return rms if method == "activation" else norms * rms


def keep_top(scores: torch.Tensor, k: int) -> list[int]:
    """The k highest-scoring neurons, in their original order (ties to the lower index)."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


@dataclass
class Refit:
    """A down projection's refit onto kept neurons: W' = W @ matrix (None: the plain slice
    was best on held-out examples), with the relative reconstruction errors it was chosen by."""

    matrix: torch.Tensor | None  # (F, K) float64
    ridge: float | None  # the chosen lam / mean diag S[K, K]; None: no refit
    error_slice: float  # E||W a - W[:, K] a_K||^2 / E||W a||^2 on all calibration tokens
    error: float  # the same for what is kept (the refit, or the slice)
    # the kept form's error on held-out examples (each half fitted on the other): the honest
    # figure, since with fewer routed tokens than kept neurons an in-sample fit is exact
    error_held_out: float = math.nan


def _mixing(s: torch.Tensor, kept: list[int], lam: float) -> torch.Tensor:
    """M = (S[:, K] + lam P)(S[K, K] + lam I)^-1."""
    k = torch.tensor(kept)
    a = s[k][:, k] + lam * torch.eye(len(kept), dtype=s.dtype)
    b = s[:, k] + lam * _selection(s.shape[0], kept)
    # a is symmetric positive definite (a second moment plus lam > 0): (a^-1 b^T)^T = b a^-1.
    # Cholesky, not LU: torch's LU solve fails inside MKL under OMP_THREAD_LIMIT=1 (measured
    # with torch 2.13: "Pivots given to lu_solve must all be greater or equal to 1").
    return torch.cholesky_solve(b.T.contiguous(), torch.linalg.cholesky(a)).T


def _selection(width: int, kept: list[int]) -> torch.Tensor:
    p = torch.zeros(width, len(kept), dtype=torch.float64)
    p[torch.tensor(kept), torch.arange(len(kept))] = 1.0
    return p


def _relative(w: torch.Tensor, s: torch.Tensor, m: torch.Tensor, kept: list[int]) -> float:
    """E||W a - W M a_K||^2 / E||W a||^2 for activations a with second moment S (a_K: the
    kept neurons' activations; M = P, the selection, is the plain slice). In float32: the
    error is formed from the residual map itself, not as a difference of large numbers."""
    w, s, m = w.float(), s.float(), m.float()
    residual = w.clone()  # W - W M P^T: W M goes into the kept columns
    residual[:, kept] -= w @ m
    total = float(((w @ s) * w).sum())
    err = float(((residual @ s) * residual).sum())
    return max(0.0, err) / total if total > 0 else 0.0


def slice_error(down: torch.Tensor, stats: NeuronStats | None, kept: list[int]) -> float:
    """The plain slice's relative reconstruction error on all calibration tokens (nan: none
    reached the MLP, or only the diagonal was collected)."""
    s = stats.second_moment() if stats is not None and stats.full else None
    if s is None:
        return math.nan
    p = _selection(down.shape[1], kept)
    return _relative(down.double().cpu(), s, p, kept)


def refit(down: torch.Tensor, stats: NeuronStats | None, kept: list[int]) -> Refit:
    """The refitted down projection for `kept`, its ridge chosen on held-out examples."""
    w = down.double().cpu()
    width = w.shape[1]
    p = _selection(width, kept)
    s_all = stats.second_moment() if stats is not None else None
    if s_all is None:  # no calibration token reached it: nothing to fit
        return Refit(None, None, math.nan, math.nan, math.nan)
    slice_error = _relative(w, s_all, p, kept)
    halves = [stats.second_moment(h) for h in (0, 1)]
    scale = float(s_all.diagonal()[torch.tensor(kept)].mean())
    if scale <= 0 or any(h is None for h in halves):
        return Refit(None, None, slice_error, slice_error, slice_error)
    total = sum(stats.weights)
    best_ridge, best_error = None, sum(_relative(w, halves[h], p, kept) * stats.weights[h]
                                       for h in (0, 1)) / total
    for ridge in RIDGE_GRID:
        held_out = 0.0
        for fit, test in ((0, 1), (1, 0)):
            m = _mixing(halves[fit], kept, ridge * scale)
            held_out += _relative(w, halves[test], m, kept) * stats.weights[test] / total
        if held_out < best_error:
            best_ridge, best_error = ridge, held_out
    if best_ridge is None:
        return Refit(None, None, slice_error, slice_error, best_error)
    m = _mixing(s_all, kept, best_ridge * scale)
    return Refit(m, best_ridge, slice_error, _relative(w, s_all, m, kept), best_error)
