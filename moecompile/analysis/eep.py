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
    seed: int = SEED


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
    """Run the search. `evaluate(plans) -> fitness` scores per-layer plans; `starts` are named
    one-hot plans (the baselines) that seed the initial population; `router_mode` (see
    expert_plan.py: onehot | exact | logits) is what the target can hold."""
    rng = np.random.default_rng(config.seed)
    groups = _groups(layers, config.groups)
    archive: list[Individual] = []
    seen: dict[bytes, float] = {}
    t0 = time.monotonic()
    total = config.evaluations
    result = EEPResult({}, float("-inf"), 0, 0.0)
    bar = tqdm(total=total if config.seconds is None else None, desc="EEP search", unit="eval",
               disable=not progress, dynamic_ncols=True)

    def plans_of(ind: Individual) -> dict[int, LayerPlan]:
        return {layer: LayerPlan(ind.merge[g], ind.router[g])
                for g, members in enumerate(groups) for layer in members}

    def add(ind: Individual) -> None:
        k = ind.key()
        if k in seen:
            return
        ind.fitness = seen[k] = evaluate(plans_of(ind))
        archive.append(ind)
        best = max(archive, key=lambda a: a.fitness)  # max keeps the earliest of ties
        result.history.append((len(archive), best.fitness))
        bar.update(1)
        bar.set_postfix(best=f"{best.fitness:.4f}", refresh=False)

    def budget_left() -> bool:
        if config.seconds is not None:
            return time.monotonic() - t0 < config.seconds
        return len(archive) < total

    phase1_exhausted = n_keep == n_experts  # only one one-hot individual: the identity

    def in_phase1() -> bool:
        if phase1_exhausted:
            return False
        if config.seconds is not None:
            return time.monotonic() - t0 < config.seconds / 4
        return len(archive) < min(config.discrete_evals, total)

    try:
        # initial population: the baselines' choices, then random subsets
        for name, plans in starts.items():
            ind = _from_plans(plans, groups)
            add(ind)
            result.initial[name] = seen[ind.key()]
        tries = 0
        while len(archive) < config.max_init and budget_left() and tries < 10 * config.max_init:
            tries += 1
            merge = [np.eye(n_experts)[np.sort(rng.choice(n_experts, n_keep, replace=False))]
                     for _ in groups]
            add(Individual(merge, [m.copy() for m in merge]))
        stale = 0
        while budget_left() and stale < 1000:
            phase1 = in_phase1()
            child = _child(archive, rng, config, router_mode, phase1, n_experts, len(groups))
            before = len(archive)
            add(child)
            stale = 0 if len(archive) > before else stale + 1
            if phase1:
                result.phase1_best = max(a.fitness for a in archive)
                if stale >= 200:  # every one-hot neighbour of the parents was tried
                    phase1_exhausted, stale = True, 0
    finally:
        bar.close()
    best = max(archive, key=lambda a: a.fitness)
    result.plans = plans_of(best)
    result.fitness = best.fitness
    result.evaluations = len(archive)
    result.seconds = time.monotonic() - t0
    return result


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


