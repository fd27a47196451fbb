"""A generation of pruning candidates scored in one layer-major pass (EEP and `--top-k`
search at real size).

Scoring each candidate with a streaming pass of its own reads the whole model per candidate
and, for a merging candidate, rebuilds every merged expert from the experts it mixes one
weight at a time (measured on 4 OLMoE layers: 10 s a one-hot candidate, 15-20 s a merging
one). The search makes its children in generations (`--search-batch`, eep.py), so a
generation can share what a pass per candidate repeats:

- each block's weights are read once per generation: its experts stacked as float32
  (E, F, D) while the block is resident (executor.experts_stacked; twice its bf16 bytes:
  memory follows the largest block; held as stored and widened for each merge, a merging
  candidate took 1.4x as long), so a candidate's kept experts are views and its merged
  experts one matrix product over the stack (as the in-memory evaluator builds them),
  `MERGE_CHUNK` slots at a time;
- candidates are grouped by their plans of the layers above: a group shares its hidden
  states and its attention; it splits where its plans for a layer differ;
- hidden states at MoE block boundaries are kept across generations on disk
  (kept_states.py), keyed by the plans above the boundary, so a child that differs from its
  parent only in deep layers starts from its parent's state (most children do);
- the pre-MoE part and the embedding are computed once, and the output head only at the
  tokens the fitness scores (a task's answers).

The arithmetic is the in-memory evaluator's (fitness.planned_moe) on the streaming
executor's blocks; the score is `StreamingFitness`'s, so a candidate scores what a pass of its
own gives to float tolerance (tested).
"""

from __future__ import annotations

import torch

from moecompile import ir
from moecompile.runtime.streaming import StreamingExecutor, real_states, with_ffn

from .calibration import CalibSet
from .eep import Scorer
from .expert_plan import LayerPlan, apply_plans, is_one_hot, moe_layers
from .fitness import StreamingFitness, plan_key, planned_moe
from .kept_states import KeptStates
from .shards import stream

MERGE_CHUNK = 8  # merged slots built by one product over the stacked experts


def candidates_at_size(engine, model: ir.Model, calib: CalibSet, router_mode: str,
                       reference: StreamingFitness | None, batch: int, search: bool = True):
    """The scorer of a search at real size. In this process: generations scored by one
    pass each (`PopulationScorer`). On an engine with several workers: each candidate by a
    streaming pass of its own whose token shards go to the workers (analysis/shards.py): the
    workers share a candidate's pass, not a generation's. Either scores a candidate once.
    `search`: generations follow (states are kept for them), not one candidate alone."""
    if not engine.distributed:
        return PopulationScorer(PopulationFitness(model, calib, router_mode, reference,
                                                  engine.device, keep_states=search), batch)
    scored: dict[tuple, float] = {}
    layers = moe_layers(model)

    def fitness(plans: dict[int, LayerPlan]) -> float:
        key = tuple(plan_key(plans.get(layer)) for layer in layers)
        if key not in scored:
            _, after = stream(engine, apply_plans(model, plans, router_mode), calib, None,
                              StreamingFitness(calib, reference))
            scored[key] = after.value()
        return scored[key]
    return Scorer(fitness)


class PopulationFitness:
    """Scores candidates (per-layer plans of `model`) on `calib`, a generation at a time.
    `reference`: the original's `StreamingFitness` for a text fitness (KL to its top-K), None
    for tasks."""

    def __init__(self, model: ir.Model, calib: CalibSet, router_mode: str,
                 reference: StreamingFitness | None, device: str | None = None,
                 keep_states: bool = True):
        self.model, self.calib, self.router_mode = model, calib, router_mode
        self.keep_states = keep_states
        self.reference = reference
        self.ex = StreamingExecutor(model, device)
        self.layers = moe_layers(model)
        self.first = self.layers[0]
        self.scored: dict[tuple, float] = {}
        self.evaluations = self.cache_hits = self.generations = 0
        self._states = KeptStates()
        ids = calib.ids.to(self.ex.device)
        with torch.no_grad():
            h, self.mask, self.positions = self.ex.embed(ids, calib.mask)
            self.real, self.rows, self.padded = self.ex.layout(ids, calib.mask)
            # the head runs only where the fitness scores (a task's answer tokens)
            self.scored_rows = self.rows[calib.targets.reshape(-1)[self.rows.cpu()].to(
                self.rows.device) != -100]
            for i in range(self.first):
                h = self._block(i, h, None)
                self.ex.release()
        self.h_first = h

    # ------------------------------------------------------------------ public
    def score(self, candidates: list[dict[int, LayerPlan]]) -> list[float]:
        """Each candidate's fitness (higher is better), the new ones in one pass."""
        keys = [tuple(plan_key(c.get(i)) for i in self.layers) for c in candidates]
        new = {k: c for k, c in zip(keys, candidates) if k not in self.scored}
        if new:
            self.scored.update(self._pass(new))
            self.generations += 1
            self.evaluations += len(new)
        return [self.scored[k] for k in keys]

    # ------------------------------------------------------------------ the pass
    @torch.no_grad()
    def _pass(self, candidates: dict[tuple, dict[int, LayerPlan]]) -> dict[tuple, float]:
        start = {k: self._cached_start(k) for k in candidates}
        live: dict[tuple, torch.Tensor] = {}  # plans of the MoE layers above -> state
        for i in range(self.first, len(self.model.blocks)):
            for k, (block, state) in start.items():
                if block == i:
                    live.setdefault(k[:self._above(i)], state)
            if not live:
                continue
            self.ex.advise(i + 1)
            planned = i in self.layers
            above = self._above(i)
            following: dict[tuple, torch.Tensor] = {}
            while live:  # each state dropped once its block is computed
                prefix, h = live.popitem()
                # the distinct plans for this layer among the candidates sharing the prefix
                plans = {k[:above + 1] if planned else prefix: candidates[k].get(i)
                         for k in candidates if start[k][0] <= i and k[:above] == prefix}
                after = self.ex.attend(i, h, self.mask, self.positions, self.real)
                for key, plan in plans.items():
                    following[key] = self._ffn(i, after, plan)
                    if self.keep_states and i + 1 in self.layers:
                        self._states.put((i + 1, key), following[key])
            live = following
            self.ex.release()
        out = {}
        for k in candidates:
            fitness = StreamingFitness(self.calib, self.reference)
            self.ex.run_head(live[k], self.scored_rows, fitness.consume)
            out[k] = fitness.value()
        self.ex.release()
        return out

    def _above(self, i: int) -> int:
        """How many MoE layers come before block i (the length of a plan prefix there)."""
        return sum(layer < i for layer in self.layers)

    def _cached_start(self, key: tuple) -> tuple[int, torch.Tensor]:
        """(block, state): the deepest kept state this candidate shares, or the first MoE
        block's input."""
        for pos in range(len(self.layers) - 1, 0, -1):
            hit = self._states.get((self.layers[pos], key[:pos]), self.ex.device)
            if hit is not None:
                self.cache_hits += 1
                return self.layers[pos], hit
        return self.first, self.h_first

    def close(self) -> None:
        """Remove the kept states."""
        self._states.close()

    # ------------------------------------------------------------------ one block
    def _block(self, i: int, h: torch.Tensor, plan: LayerPlan | None) -> torch.Tensor:
        return self._ffn(i, self.ex.attend(i, h, self.mask, self.positions, self.real), plan)

    def _ffn(self, i: int, after: torch.Tensor, plan: LayerPlan | None) -> torch.Tensor:
        """Block i's second half on the states after attention, under the candidate's plan
        for the layer (None: the original's FFN)."""
        h_mid = real_states(after, self.rows, self.padded)
        if plan is None:
            h_out = self.ex.ffn_residual(i, h_mid)
        else:
            x = self.ex.ffn_input(i, h_mid)
            h_out = h_mid + planned_moe(self.ex, i, x, plan, self.router_mode,
                                        self._slots(i, plan))
        return with_ffn(after, h_out, self.rows, self.padded)

    def _slots(self, i: int, plan: LayerPlan):
        """slot j -> its (gate, up, down): a view of the stack for a kept expert; merged slots
        are built `MERGE_CHUNK` at a time by one product over the stack."""
        stack = self.ex.experts_stacked(i)  # held until the block is released
        if is_one_hot(plan.merge):
            kept = plan.kept
            return lambda j: tuple(w[kept[j]] for w in stack)
        m = torch.tensor(plan.merge, dtype=torch.float32, device=self.ex.device)
        chunk: dict = {}

        def slot(j: int):
            c = j // MERGE_CHUNK
            if c not in chunk:
                chunk.clear()  # combine_experts asks for slots in increasing order
                rows = m[c * MERGE_CHUNK:(c + 1) * MERGE_CHUNK]
                chunk[c] = [torch.einsum("je,e...->j...", rows, w) for w in stack]
            return tuple(w[j - c * MERGE_CHUNK] for w in chunk[c])
        return slot


class PopulationScorer:
    """A `Scorer` (eep.py) over a `PopulationFitness`: the search submits up to `parallel`
    candidates (a generation), and the first result asked for scores every candidate
    submitted and not yet scored, in one pass."""

    def __init__(self, fitness: PopulationFitness, parallel: int):
        self.fitness, self.parallel = fitness, max(1, parallel)
        self._pending: dict[int, dict] = {}
        self._done: dict[int, float] = {}
        self._next = 0

    def submit(self, plans: dict[int, LayerPlan]) -> int:
        self._next += 1
        self._pending[self._next] = plans
        return self._next

    def result(self, handle: int) -> float:
        if handle in self._pending:
            handles = list(self._pending)
            values = self.fitness.score([self._pending[h] for h in handles])
            self._done.update(zip(handles, values))
            self._pending.clear()
        return self._done.pop(handle)

    def cancel(self, handle: int) -> None:
        self._pending.pop(handle, None)
        self._done.pop(handle, None)

    def score(self, plans: dict[int, LayerPlan]) -> float:
        return self.result(self.submit(plans))

    def close(self) -> None:
        self.fitness.close()
