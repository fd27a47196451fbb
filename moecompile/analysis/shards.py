"""One layer-major calibration pass, split by calibration examples over an engine's workers.

Observers keep sums (observers.py) and `StreamingFitness` keeps per-example counts and sums,
so a pass over the whole set is the merge of passes over disjoint shards of its examples —
llm-compressor's data-parallel calibration, shared/research/scale.md §4.1 and §6.12. Each
worker runs `StreamingExecutor` on its shard and returns its states; they are merged here in
shard order. Counts come out exact; sums to float tolerance (a shard's matmuls round in
another batch shape and the sums add in another order). With one worker (the in-process
engine) the one shard is the whole set: the numbers of the unsharded pass, bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from moecompile import ir

from .calibration import CalibSet
from .fitness import StreamingFitness


def split(calib: CalibSet, n: int) -> list[list[int]]:
    """min(n, examples) contiguous runs of examples with about equal token counts."""
    count = calib.n_examples
    n = max(1, min(n, count))
    tokens = np.cumsum(calib.mask.sum(dim=1).numpy())
    bounds = [0]
    for k in range(1, n):
        b = int(np.searchsorted(tokens, tokens[-1] * k / n, side="left")) + 1
        bounds.append(min(max(b, bounds[-1] + 1), count - (n - k)))
    bounds.append(count)
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def stream(engine, model: ir.Model, calib: CalibSet, observer=None,
           fitness: StreamingFitness | None = None, numerics=None, shards: int | None = None,
           what: tuple | None = None, progress: str | None = None):
    """Run `model` over `calib` layer-major on the engine's workers, feeding `observer`
    (its `merge` combines shards) and `fitness` (the head's logits); both are filled in
    place and returned. `shards`: how many (default: one per worker). `what` names the pass
    for resuming (runtime/resume.py): each shard saves its progress after every block under a
    key of its own tokens, so the same command resumes each shard where it stopped (with one
    shard, the key of the unsharded pass). `progress`: a bar over the blocks, shown by a shard
    run in this process (a Ray worker's output is not forwarded)."""
    shards = split(calib, shards or engine.workers)
    parts = engine.map(_run_shard, (model, calib, observer, fitness, numerics, what, progress),
                       shards)
    for part_observer, part_fitness in parts:
        if observer is not None:
            observer.merge(part_observer)
        if fitness is not None:
            fitness.merge(part_fitness)
    return observer, fitness


@torch.no_grad()
def _run_shard(shared, rows: list[int], device: str):
    """One shard: the examples `rows` through the model; (observer, fitness) of the shard,
    detached from the executor so they travel back."""
    from moecompile.runtime.resume import resume_for
    from moecompile.runtime.streaming import HEAD_INPUT, StreamingExecutor

    model, calib, observer, fitness, numerics, what, progress = shared
    observer = observer.part(rows) if observer is not None else None
    part = fitness.part(rows) if fitness is not None else None
    sub = calib.subset(rows)
    resume = resume_for(model, sub, *what) if what is not None else None
    # observers alone see the output head's input (a matmul input too); fitness needs logits
    StreamingExecutor(model, device, numerics, observer=observer, progress=progress).run(
        sub.ids, sub.mask, part.consume if part is not None else HEAD_INPUT, resume)
    if observer is not None:
        observer.attach(None)
    return observer, part
