"""EEP: Efficient Expert Pruning by gradient-free evolutionary search (arXiv 2407.00945).

For each group of MoE layers the search looks for two E' x E matrices (see expert_plan.py):
the expert-merging matrix W_EM and the router-mapping matrix W_RM. Fitness is the model's own
behaviour on calibration data, by inference only (fitness.py). As in the authors' released
search (configs/search/search.yml, search.py; digest in shared/research/eep.md §2-3):

- steady state with an elitist archive: every evaluated individual stays; each iteration makes
  one child from parents near the top and evaluates it;
- phase 1, pruning (the first `discrete_evals` evaluations): one-hot rows, W_RM == W_EM; the
  initial individuals are the baselines' choices plus random subsets (up to `max_init`), and a
  child swaps each row of a touched group (p=0.25 per group) for an unused expert with p=0.15;
- phase 2, merging: W_EM and W_RM become real-valued; a child is a row-wise crossover of two
  parents (p=0.3, rows from the first parent with p=0.6) or a copy of one, then Gaussian noise
  (sigma 0.065) on each element with p=0.25 in touched groups, and W_EM rows renormalised to
  sum 1 with p=0.1;
- parents: uniformly among individuals within `threshold` of the best fitness (3 accuracy
  points in phase 1, 1 in phase 2) and at least the `parents_rank` best;
- the answer is the best individual; ties go to the earlier one.

Deviations, each for a stated reason:
- starting from the baselines' choices (not only random subsets) makes EEP never worse than
  them on the calibration set, at no cost;
- targets without a continuous router (llama.cpp) keep W_RM one-hot through phase 2
  (`router_mode="onehot"`): only W_EM is searched there, and a crossover row carries its router
  row along so a slot's routing and weights come from the same parent. The exact form
  ("exact") is searched for targets that can compute it; tools/bench_prune.py measures the
  difference. "logits" searches W_RM as a linear mix of router rows, which GGUF can hold;
- with E' == E (top-k reduction) there is nothing to prune: the search starts in phase 2 from
  the identity;
- groups default to one per MoE layer (the paper's default is 4 groups of 8 layers of Mixtral;
  its own ablation shows per-layer groups prune better), `groups=G` shares matrices across G
  contiguous groups of layers;
- fitness on task data is teacher-forced exact match with a sub-example tie-breaker
  (fitness.py), equal to greedy exact match but one forward pass.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .expert_plan import LayerPlan

SEED = 11450  # the released search's seed, as the default


@dataclass
class EEPConfig:
    evaluations: int = 400  # total evaluations (the released config's total_iter)
    seconds: float | None = None  # or a time budget; phase 2 starts at a quarter of it
    discrete_evals: int = 100  # phase 1 length (discrete_iter)
    max_init: int = 30
    groups: int | None = None  # None: one group per MoE layer
    row_swap_prob: float = 0.15
    group_change_prob: float = 0.25
    crossover_prob: float = 0.3
    front_prob: float = 0.6
    sigma: float = 0.065
    element_prob: float = 0.25
    norm_prob: float = 0.1
    threshold_phase1: float = 0.03  # 3 accuracy points, as a fraction
    threshold_phase2: float = 0.01
    parents_rank: int = 6
    # children made from one archive state (see search): a generation, which workers score
    # side by side and a search at real size scores in one pass (population.py); the CLI's
    # --search-batch default
    batch: int = 8
    seed: int = SEED
    asked: bool = False  # the length came from the user (--search-budget), not the default


@dataclass
class Individual:
    merge: list[np.ndarray]  # per group, (E', E)
    router: list[np.ndarray]
    fitness: float = float("-inf")

    def key(self) -> bytes:
        return b"".join(m.tobytes() + r.tobytes() for m, r in zip(self.merge, self.router))


@dataclass
class EEPResult:
    plans: dict[int, LayerPlan]
    fitness: float
    evaluations: int
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)  # (evaluation, best so far)
    initial: dict[str, float] = field(default_factory=dict)  # fitness of each seeded start
    phase1_best: float = float("-inf")


def search(evaluate, layers: list[int], n_experts: int, n_keep: int,
           starts: dict[str, dict[int, LayerPlan]], config: EEPConfig,
           router_mode: str = "onehot", progress: bool = True) -> EEPResult:
    """Run the search. `evaluate` scores per-layer plans: a function `plans -> fitness`, or a
    `Scorer` that scores several candidates at once (on workers,
    moecompile/distributed/); the result is the same either way. `starts` are named one-hot
    plans (the baselines) that seed the initial population; `router_mode` (see
    expert_plan.py: onehot | exact | logits) is what the target can hold.

    The search is a sequence of steps, each making one individual from the state (archive,
    random generator, counters). Which individual a step makes depends on fitness values only
    through the parents, and parents are chosen from the archive as it stood when the
    current batch of `config.batch` children began; the initial population depends on no
    fitness at all. So every step of a batch can be made before any of its results is in,
    the candidates scored side by side, and the results recorded in step order: the same
    genomes, fitness values and answer for any number of workers."""
    scorer = as_scorer(evaluate)
    groups = _groups(layers, config.groups)
    t0 = time.monotonic()
    result = EEPResult({}, float("-inf"), 0, 0.0)
    bar = tqdm(total=config.evaluations if config.seconds is None else None, desc="EEP search",
               unit="eval", disable=not progress, dynamic_ncols=True)
    steps = _Steps(config, groups, n_experts, n_keep, router_mode, t0)
    state = _State(np.random.default_rng(config.seed), list(starts.items()))
    queue: deque[_Step] = deque()  # made, recorded in this order
    try:
        while True:
            while sum(s.handle is not None for s in queue) < scorer.parallel:
                step = steps.next(state)
                if step is None or step is _WAIT:
                    break
                if step.new:
                    step.handle = scorer.submit(steps.plans(step.individual))
                queue.append(step)
            if not queue:
                break
            head = queue.popleft()
            if head.new:
                steps.record(state, head, scorer.result(head.handle))
                best = max(state.archive[:state.recorded], key=lambda a: a.fitness)
                result.history.append((state.recorded, best.fitness))  # max keeps the earliest
                bar.update(1)
                bar.set_postfix(best=f"{best.fitness:.4f}", refresh=False)
            if head.start is not None:
                result.initial[head.start] = state.seen[head.individual.key()]
            if head.phase1:
                result.phase1_best = max(a.fitness for a in state.archive[:state.recorded])
    finally:
        for s in queue:
            if s.handle is not None:
                scorer.cancel(s.handle)
        bar.close()
    best = max(state.archive, key=lambda a: a.fitness)
    result.plans = steps.plans(best)
    result.fitness = best.fitness
    result.evaluations = len(state.archive)
    result.seconds = time.monotonic() - t0
    return result


class Scorer:
    """Scores candidates, `parallel` of them in flight at once. This one runs a function in
    this process, one candidate at a time, when its result is asked for."""

    parallel = 1

    def __init__(self, evaluate):
        self.evaluate = evaluate

    def submit(self, plans: dict[int, LayerPlan]):
        return plans

    def result(self, handle) -> float:
        return self.evaluate(handle)

    def cancel(self, handle) -> None:
        pass

    def score(self, plans: dict[int, LayerPlan]) -> float:
        return self.result(self.submit(plans))

    def close(self) -> None:
        pass


def as_scorer(evaluate) -> Scorer:
    return evaluate if hasattr(evaluate, "submit") else Scorer(evaluate)


@dataclass
class _Step:
    """One step of the search: the individual it made, whether it is new, its evaluation."""

    individual: Individual
    new: bool  # not seen before: it is scored and joins the archive
    phase1: bool = False
    start: str | None = None  # the baseline it is
    handle: object = None


_WAIT = object()  # the next step needs results still in flight


@dataclass
class _State:
    """Everything the next step depends on. `archive` holds every new individual made so far;
    the first `recorded` have their fitness."""

    rng: np.random.Generator
    starts: list  # named starts not yet made
    archive: list[Individual] = field(default_factory=list)
    seen: dict[bytes, float | None] = field(default_factory=dict)
    recorded: int = 0
    tries: int = 0  # random initial individuals tried; -1 once that stage is over
    stale: int = 0
    phase1_exhausted: bool = False
    parents_from: list[Individual] = field(default_factory=list)  # the archive the batch began with
    batch_left: int = 0


class _Steps:
    """The search as a step function on a `_State`: `next` makes the next individual, `record`
    stores its fitness."""

    def __init__(self, config: EEPConfig, groups, n_experts, n_keep, router_mode, t0):
        self.config, self.groups, self.t0 = config, groups, t0
        self.n_experts, self.n_keep, self.router_mode = n_experts, n_keep, router_mode
        self.identity_only = n_keep == n_experts  # only one one-hot individual: the identity

    def plans(self, ind: Individual) -> dict[int, LayerPlan]:
        return {layer: LayerPlan(ind.merge[g], ind.router[g])
                for g, members in enumerate(self.groups) for layer in members}

    def budget_left(self, state: _State) -> bool:
        if self.config.seconds is not None:
            return time.monotonic() - self.t0 < self.config.seconds
        return len(state.archive) < self.config.evaluations

    def in_phase1(self, state: _State) -> bool:
        if self.identity_only or state.phase1_exhausted:
            return False
        if self.config.seconds is not None:
            return time.monotonic() - self.t0 < self.config.seconds / 4
        return len(state.archive) < min(self.config.discrete_evals, self.config.evaluations)

    def next(self, state: _State):
        """The next step, None when the search is over, or _WAIT when it needs the results in
        flight (a new batch of children chooses parents from every result before it)."""
        config, rng = self.config, state.rng
        if state.starts:
            # initial population: the baselines' choices, then random subsets
            name, plans = state.starts.pop(0)
            return self._made(state, _from_plans(plans, self.groups), start=name)
        if (state.tries >= 0 and len(state.archive) < config.max_init and self.budget_left(state)
                and state.tries < 10 * config.max_init):
            state.tries += 1
            merge = [np.eye(self.n_experts)[np.sort(rng.choice(self.n_experts, self.n_keep,
                                                               replace=False))]
                     for _ in self.groups]
            return self._made(state, Individual(merge, [m.copy() for m in merge]))
        state.tries = -1
        if not (self.budget_left(state) and state.stale < 1000):
            return None
        if state.batch_left == 0:
            if state.recorded < len(state.archive):
                return _WAIT
            state.parents_from, state.batch_left = list(state.archive), config.batch
        state.batch_left -= 1
        phase1 = self.in_phase1(state)
        child = _child(state.parents_from, rng, config, self.router_mode, phase1,
                       self.n_experts, len(self.groups))
        step = self._made(state, child, phase1=phase1)
        state.stale = 0 if step.new else state.stale + 1
        if phase1 and state.stale >= 200:  # every one-hot neighbour of the parents was tried
            state.phase1_exhausted, state.stale = True, 0
        return step

    @staticmethod
    def _made(state: _State, ind: Individual, phase1: bool = False, start: str | None = None) -> _Step:
        key = ind.key()
        new = key not in state.seen
        if new:
            state.seen[key] = None
            state.archive.append(ind)
        return _Step(ind, new, phase1, start)

    @staticmethod
    def record(state: _State, step: _Step, fitness: float) -> None:
        step.individual.fitness = state.seen[step.individual.key()] = fitness
        state.recorded += 1


def _groups(layers: list[int], n_groups: int | None) -> list[list[int]]:
    if n_groups is None or n_groups >= len(layers):
        return [[layer] for layer in layers]
    n_groups = max(1, n_groups)
    bounds = np.linspace(0, len(layers), n_groups + 1).round().astype(int)
    return [layers[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _from_plans(plans: dict[int, LayerPlan], groups: list[list[int]]) -> Individual:
    """A seeded start; a group spanning several layers takes its first layer's choice."""
    merge = [plans[g[0]].merge.copy() for g in groups]
    router = [plans[g[0]].router.copy() for g in groups]
    return Individual(merge, router)


def _parents(archive: list[Individual], threshold: float, rank: int) -> list[Individual]:
    order = sorted(range(len(archive)), key=lambda i: (-archive[i].fitness, i))
    best = archive[order[0]].fitness
    return [archive[i] for n, i in enumerate(order) if n < rank or archive[i].fitness >= best - threshold]


def _touched(rng: np.random.Generator, n_groups: int, p: float) -> np.ndarray:
    while True:
        flags = rng.random(n_groups) < p
        if flags.any():
            return flags


def _child(archive: list[Individual], rng: np.random.Generator, config: EEPConfig,
           router_mode: str, phase1: bool, n_experts: int, n_groups: int) -> Individual:
    flags = _touched(rng, n_groups, config.group_change_prob)
    if phase1:
        pool = _parents(archive, config.threshold_phase1, config.parents_rank)
        parent = pool[rng.integers(len(pool))]
        merge = []
        for g, m in enumerate(parent.merge):
            m = m.copy()
            if flags[g]:
                for j in range(m.shape[0]):
                    if rng.random() < config.row_swap_prob:
                        used = set(m.argmax(axis=1).tolist())
                        free = [e for e in range(n_experts) if e not in used]
                        if free:
                            m[j] = np.eye(n_experts)[free[rng.integers(len(free))]]
            merge.append(m[np.argsort(m.argmax(axis=1))])  # canonical order: no duplicates
        return Individual(merge, [m.copy() for m in merge])

    pool = _parents(archive, config.threshold_phase2, config.parents_rank)
    first = pool[rng.integers(len(pool))]
    if rng.random() < config.crossover_prob and len(pool) > 1:
        second = pool[rng.integers(len(pool))]
        merge, router = _crossover(first, second, flags, rng, config, router_mode)
    else:
        merge, router = [m.copy() for m in first.merge], [r.copy() for r in first.router]
    for g in range(n_groups):
        if not flags[g]:
            continue
        merge[g] = _perturb(merge[g], rng, config)
        if router_mode != "onehot":
            router[g] = _perturb(router[g], rng, config)
    if rng.random() < config.norm_prob:
        merge = [m / np.where(np.abs(s := m.sum(axis=1, keepdims=True)) < 1e-8, 1.0, s)
                 for m in merge]
    return Individual(merge, router)


def _perturb(m: np.ndarray, rng: np.random.Generator, config: EEPConfig) -> np.ndarray:
    hit = rng.random(m.shape) < config.element_prob
    return m + hit * rng.normal(0.0, config.sigma, m.shape)


def _crossover(a: Individual, b: Individual, flags: np.ndarray, rng: np.random.Generator,
               config: EEPConfig, router_mode: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    merge, router = [], []
    for g in range(len(a.merge)):
        if flags[g]:
            rows = rng.random(a.merge[g].shape[0]) < config.front_prob
            m = np.where(rows[:, None], a.merge[g], b.merge[g])
            if router_mode != "onehot":
                rows_r = rng.random(a.router[g].shape[0]) < config.front_prob
                r = np.where(rows_r[:, None], a.router[g], b.router[g])
            else:
                # the one-hot router row travels with its merge row
                r = np.where(rows[:, None], a.router[g], b.router[g])
                if len(set(r.argmax(axis=1).tolist())) < r.shape[0]:
                    m, r = a.merge[g], a.router[g]  # two slots on one router row: keep parent 1
        else:
            src = a if rng.random() < config.front_prob else b
            m, r = src.merge[g], src.router[g]
        merge.append(np.array(m, dtype=np.float64))
        router.append(np.array(r, dtype=np.float64))
    return merge, router


