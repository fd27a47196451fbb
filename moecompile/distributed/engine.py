"""The engine a job's passes give their independent work to: one interface, run in this
process or on Ray workers, so both are the same operation (shared/research/scale.md §6.12:
"Executor.map(task, shards) -> states; merge(states)").

- `map(task, shared, shards)`: data parallelism. `task(shared, shard, device)` for every
  shard, results in shard order; a calibration pass splits its rows into `workers` shards
  and merges the observer states the shards return (analysis/shards.py);
- `candidates(model, calib, router_mode, reference)`: candidate parallelism (a text fitness
  is the KL to `reference`, default the model itself). A `Scorer` (eep.py) whose
  fitness evaluators live where the work runs: here one `FitnessEvaluator` in this process;
  on Ray one per worker, each built once from the model IR and calibration set, scoring
  plans (small matrices) sent to it;
- `report()`: what ran where, for the job's report (never the pass history: the output file
  must not depend on how the work was spread).
"""

from __future__ import annotations

from typing import Callable, Sequence


class Engine:
    """The in-process engine: everything runs here, in order, one piece at a time."""

    name = "in-process"
    workers = 1
    distributed = False  # work given to it runs in this process

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.scorers: list = []
        self.tasks = 0

    def map(self, task: Callable, shared, shards: Sequence) -> list:
        self.tasks += len(shards)
        return [task(shared, shard, self.device) for shard in shards]

    def candidates(self, model, calib, router_mode: str = "onehot", reference=None):
        scorer = LocalCandidates(model, calib, self.device, router_mode, reference)
        self.scorers.append(scorer)
        return scorer

    def report(self) -> dict:
        out = {"engine": self.name, "workers": self.workers, "tasks": self.tasks}
        if self.scorers:
            out["candidates"] = sum(s.evaluations for s in self.scorers)
            out["cache_hits"] = sum(s.cache_hits for s in self.scorers)
        return out

    def close(self) -> None:
        pass

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalCandidates:
    """Candidates scored by a `FitnessEvaluator` in this process, one at a time (the serial
    search: `parallel` 1)."""

    parallel = 1

    def __init__(self, model, calib, device: str, router_mode: str, reference=None):
        from moecompile.analysis.fitness import FitnessEvaluator

        self.evaluator = FitnessEvaluator(model, calib, device, router_mode=router_mode,
                                          reference=reference)

    def submit(self, plans):
        return plans

    def result(self, handle) -> float:
        return self.evaluator.fitness(handle)

    def cancel(self, handle) -> None:
        pass

    def score(self, plans) -> float:
        return self.result(self.submit(plans))

    def close(self) -> None:
        pass

    @property
    def evaluations(self) -> int:
        return self.evaluator.evaluations

    @property
    def cache_hits(self) -> int:
        return self.evaluator.cache_hits
