"""Fast fitness of expert-pruning candidates: one batched forward of the calibration set.

A search evaluates hundreds of candidates, so a candidate is never materialised as a model.
The evaluator keeps the original experts stacked per layer ((E, F, D) gate/up/down) and the
router weights, and runs the layers from the first MoE block on with each candidate's merge
and router matrices applied on the fly (an index for one-hot rows, an einsum otherwise).

What a candidate cannot change is computed once: everything before the first MoE sublayer.
Hidden states at later block boundaries are kept in a small LRU cache keyed by the candidate's
matrices for the layers above that boundary, so a child that differs from its parent only in
deep layers restarts from its parent's state (in steady-state evolution most children do).

Fitness (higher is better):
- tasks: exact-match accuracy (every answer token the teacher-forced argmax, which equals
  greedy decoding producing the answer), plus a tie-breaker smaller than one example:
  0.5/n * exp(mean log-probability of the answer tokens). Plateaus of equal accuracy are wide
  on a small calibration set; the tie-breaker lets the search move along them;
- text: minus the mean KL(original || candidate) over all calibration tokens.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

from moecompile import ir
from moecompile.runtime.executor import ReferenceExecutor, combine_experts, route, swiglu

from .calibration import CalibSet
from .expert_plan import LayerPlan, is_one_hot, moe_layers

CACHE_BYTES = 1 << 30


class FitnessEvaluator:
    def __init__(self, model: ir.Model, calib: CalibSet, device: str = "cpu",
                 router_mode: str = "onehot", reference: ir.Model | None = None):
        """`reference`: the model whose next-token distributions a text fitness measures the
        KL to (default: `model` itself; a top-k search passes the original, as the candidates
        run a reduced top-k whose own output is no target)."""
        self.model = model
        self.calib = calib
        self.router_mode = router_mode
        self.ex = ReferenceExecutor(model, device)
        self.device = self.ex.device
        self.layers = moe_layers(model)
        self.first = self.layers[0]
        ids = calib.ids.to(self.device)
        self.targets = calib.targets.to(self.device)
        self.scored = self.targets != -100
        with torch.no_grad():
            h, self.mask, self.positions = self.ex.embed(ids, calib.mask.to(self.device))
            for i in range(self.first):
                h = self.ex.block_forward(i, h, self.mask, self.positions)
        self.h_first = h
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cache_bytes = 0
        self.evaluations = 0
        self.cache_hits = 0
        self.reference_logp = None
        if calib.kind == "text":
            source = self.ex if reference is None else ReferenceExecutor(reference, device)
            with torch.no_grad():
                self.reference_logp = self._logp(source.logits(ids, calib.mask.to(self.device)))

    # ------------------------------------------------------------------ public
    def fitness(self, plans: dict[int, LayerPlan]) -> float:
        """The candidate's score (higher is better); `plans` has one entry per MoE layer."""
        self.evaluations += 1
        return self.score(self.logits(plans))

    @torch.no_grad()
    def logits(self, plans: dict[int, LayerPlan]) -> torch.Tensor:
        keys = [plan_key(plans.get(i)) for i in self.layers]
        start, h = self.first, self.h_first
        # the deepest cached block boundary whose state this candidate shares
        for pos in range(len(self.layers) - 1, 0, -1):
            hit = self._cache.get((self.layers[pos], tuple(keys[:pos])))
            if hit is not None:
                self._cache.move_to_end((self.layers[pos], tuple(keys[:pos])))
                start, h = self.layers[pos], hit
                self.cache_hits += 1
                break
        for i in range(start, len(self.model.blocks)):
            if i in self.layers and i != self.first:
                pos = self.layers.index(i)
                self._remember((i, tuple(keys[:pos])), h)
            h = self._block(i, h, plans.get(i))
        return self.ex.head(h)

    def score(self, logits: torch.Tensor) -> float:
        if self.calib.kind == "text":
            logp = self._logp(logits)
            ref = self.reference_logp
            kl = (ref.exp() * (ref - logp)).sum(-1)
            return -float(kl[self.scored].mean())
        logp = self._logp(logits)
        safe = self.targets.clamp(min=0)
        right = (logits.argmax(-1) == safe) | ~self.scored
        exact = right.all(dim=1).float().mean()
        token_logp = logp.gather(-1, safe[..., None])[..., 0][self.scored].mean()
        n = self.calib.n_examples
        return float(exact) + 0.5 / n * float(token_logp.exp())

    # ------------------------------------------------------------------ internals
    def _logp(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1)

    def _remember(self, key: tuple, h: torch.Tensor) -> None:
        if key in self._cache:
            self._cache.move_to_end(key)
            return
        size = h.numel() * h.element_size()
        while self._cache and self._cache_bytes + size > CACHE_BYTES:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.numel() * old.element_size()
        self._cache[key] = h
        self._cache_bytes += size

    def _block(self, i: int, h: torch.Tensor, plan: LayerPlan | None) -> torch.Tensor:
        ex = self.ex
        h = ex.attention_residual(i, h, self.mask, self.positions)
        if plan is None:
            return ex.ffn_residual(i, h)
        return h + self._planned_moe(i, ex.ffn_input(i, h), plan)

    def _planned_moe(self, i: int, x: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
        gate, up, down = self.ex.experts_stacked(i)  # built once, on a candidate's first use
        if is_one_hot(plan.merge):
            kept = plan.kept
            return planned_moe(self.ex, i, x, plan, self.router_mode,
                               lambda j: (gate[kept[j]], up[kept[j]], down[kept[j]]))
        m = torch.tensor(plan.merge, dtype=torch.float32, device=self.device)
        merged = [torch.einsum("je,e...->j...", m, w) for w in (gate, up, down)]
        return planned_moe(self.ex, i, x, plan, self.router_mode,
                           lambda j: tuple(w[j] for w in merged))


def planned_moe(ex: ReferenceExecutor, i: int, x: torch.Tensor, plan: LayerPlan,
                router_mode: str, slot_weights) -> torch.Tensor:
    """Block i's MoE on tokens x as `apply_plans` would rebuild it from `plan`, computed from
    the original model's weights (executor `ex`) without building that model:
    `slot_weights(j)` gives slot j's (gate, up, down), an original expert or a merge."""
    moe = ex.model.blocks[i].ffn
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    # the candidate's router, as `apply_plans` would write it; the executor routes
    router_w = ex.w(f"blocks.{i}.ffn.router.weight")
    mapping = torch.tensor(plan.router, dtype=torch.float32, device=ex.device)
    router_map = None
    if router_mode == "exact" and not is_one_hot(plan.router):
        logits, router_map = x @ router_w.T, mapping
    elif router_mode == "logits" and not is_one_hot(plan.router):
        logits = x @ (mapping @ router_w).T
    else:
        rows = torch.tensor(plan.router_rows, device=ex.device)
        logits = x @ router_w[rows].T
    idx, weights = route(moe, logits, router_map, top_k=min(moe.top_k, len(plan.merge)))
    out = combine_experts(x, idx, weights, lambda j, tok: swiglu(x[tok], *slot_weights(j)))
    shared = ex.shared_expert(i, x)
    return (out if shared is None else out + shared).reshape(shape)


def plan_key(plan: LayerPlan | None) -> bytes:
    """A digest of a layer's merge and router matrices (b'' for an unplanned layer)."""
    if plan is None:
        return b""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(plan.merge, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(plan.router, dtype=np.float64).tobytes())
    return digest.digest()


TOP_K_REFERENCE = 1024  # reference log-probabilities kept per scored token for the text KL


class StreamingFitness:
    """The same fitness from a layer-major pass (runtime/streaming.py), fed logits chunk by
    chunk (`consume`), so nothing the size of tokens x vocabulary is ever held.

    Tasks: exact match and the tie-breaker, exactly as `FitnessEvaluator.score`. Text: minus the
    mean KL(original || candidate) over the scored tokens, from the original's top
    TOP_K_REFERENCE log-probabilities plus the mass of the rest as one outcome (the top-K KL
    EvoPress found as effective as the full one for K >= 512; shared/research/scale.md §6.6):
    exact for a vocabulary up to K, a lower bound beyond (the log-sum inequality), about 8 KB a
    token. Record the reference with a pass of the original (`reference=None`), then score
    candidates against it."""

    def __init__(self, calib: CalibSet, reference: "StreamingFitness | None" = None):
        self.calib = calib
        flat_targets = calib.targets.reshape(-1)
        self.targets = flat_targets
        self.example = torch.arange(calib.n_examples)[:, None].expand_as(calib.targets).reshape(-1)
        self.reference = reference
        n = calib.n_examples
        self.wrong = torch.zeros(n, dtype=torch.long)  # wrong scored tokens per example
        self.logp_sum, self.logp_count = 0.0, 0
        self.kl_sum = 0.0
        self.top: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> (ids, logp)
        self.examples: list[int] | None = None  # a shard's examples in the whole set (part)

    def consume(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        rows = rows.cpu()
        targets = self.targets[rows]
        scored = targets != -100
        if not scored.any():
            return
        rows, logits, targets = rows[scored], logits[scored.to(logits.device)].float().cpu(), targets[scored]
        logp = torch.log_softmax(logits, -1)
        if self.calib.kind == "tasks":
            wrong = (logits.argmax(-1) != targets).long()
            self.wrong.index_add_(0, self.example[rows], wrong)
            self.logp_sum += float(logp.gather(-1, targets[:, None]).sum())
            self.logp_count += len(rows)
            return
        if self.reference is None:  # the original: keep its top-K
            top = logp.topk(min(TOP_K_REFERENCE, logp.shape[-1]), dim=-1)
            for r, ids, lp in zip(rows.tolist(), top.indices, top.values):
                # a copy: the row of the chunk's result would keep (and pickle, sent to or
                # from a worker) the whole chunk's storage
                self.top[r] = (ids.clone(), lp.clone())
            self.logp_count += len(rows)
            return
        for r, q in zip(rows.tolist(), logp):
            ids, lp = self.reference.top[r]
            p = lp.exp()
            tail_p = (1 - p.sum()).clamp(min=1e-12)
            q_top = q[ids]
            tail_q = (1 - q_top.exp().sum()).clamp(min=1e-12)
            kl = float((p * (lp - q_top)).sum() + tail_p * (tail_p.log() - tail_q.log()))
            self.kl_sum += max(kl, 0.0)
            self.logp_count += 1

    def part(self, rows: list[int]) -> "StreamingFitness":
        """An empty accumulator for the calibration examples `rows` (a shard of a
        data-parallel pass, fed rows of `calib.subset(rows)`); `merge` adds it back. Its
        reference is the reference's top-K for those rows."""
        reference = None
        if self.reference is not None:
            reference = StreamingFitness(self.calib.subset(rows))
            reference.top = {local: self.reference.top[g]
                             for local, g in self._rows(rows) if g in self.reference.top}
        out = StreamingFitness(self.calib.subset(rows), reference)
        out.examples = list(rows)
        return out

    def _rows(self, rows: list[int]):
        """(row in the shard of examples `rows`, row in the whole set) of every position."""
        width = self.calib.ids.shape[1]
        for i, example in enumerate(rows):
            for t in range(width):
                yield i * width + t, example * width + t

    def merge(self, part: "StreamingFitness") -> "StreamingFitness":
        """Add a shard's sums (`part`) into this accumulator of the whole set."""
        rows = part.examples
        self.wrong.index_add_(0, torch.tensor(rows, dtype=torch.long), part.wrong)
        self.logp_sum += part.logp_sum
        self.logp_count += part.logp_count
        self.kl_sum += part.kl_sum
        if part.top:
            to_whole = dict(self._rows(rows))
            self.top.update({to_whole[local]: v for local, v in part.top.items()})
        return self

    def value(self) -> float:
        if self.calib.kind == "text":
            return -self.kl_sum / max(self.logp_count, 1) if self.reference is not None else 0.0
        exact = float((self.wrong == 0).float().mean())
        token_logp = self.logp_sum / max(self.logp_count, 1)
        return exact + 0.5 / self.calib.n_examples * float(np.exp(token_logp))
