"""The engine on Ray: one actor per worker slot, each holding its own executor.

Imported only with `--ray` (Ray is the optional extra `moecompile[distributed]`).

- Slots: `local:N` starts a cluster on this machine (127.0.0.1 only, its files in a temporary
  folder removed at the end) with N workers sharing the cores (and a GPU, if there is one);
  joining a cluster gives one worker per GPU, or one per CPU-only node using all its cores.
  Each worker's torch uses its slot's cores; its device is `--device`, else its GPU if it has
  one, else its CPU.
- Candidates: the model IR (lazy: checkpoint paths, not weights) and the calibration set are
  put in the object store once; a worker builds its `FitnessEvaluator` from them on its first
  candidate and keeps it, so what travels per candidate is its plans (a few small matrices)
  and one float back. A candidate goes to the least busy worker.
- Faults: a worker that dies is replaced by a fresh actor on the same resources and every
  piece of work it held is sent again (at most `RETRIES` times each); results are asked for by
  the caller in its own order, so a candidate is neither lost nor counted twice.
- The end (also Ctrl-C): actors killed, the cluster shut down if this run started it, its
  temporary folder removed.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import shutil
import socket
import tempfile
from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from moecompile.errors import UserError

from .address import Address
from .engine import Engine

RETRIES = 3  # times one piece of work is sent again after its worker died
READY_SECONDS = 300  # workers that cannot be placed within this are an error
IN_FLIGHT_PER_WORKER = 2  # candidates queued at each worker (RayCandidates)
_DIED = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
         ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError)


class Worker:
    """What runs in each Ray actor: tasks of `Engine.map`, and the fitness evaluators of the
    searches of this job, built on first use."""

    def __init__(self, threads: int, device: str):
        import torch

        torch.set_num_threads(threads)
        self.device = device
        self.evaluators: dict = {}

    def info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": self.device}

    def run(self, task, shared, shard):
        return task(shared, shard, self.device)

    def score(self, key: int, refs: list, router_mode: str, plans) -> float:
        evaluator = self.evaluators.get(key)
        if evaluator is None:
            from moecompile.analysis.fitness import FitnessEvaluator

            model, calib, reference = ray.get(refs)
            evaluator = self.evaluators[key] = FitnessEvaluator(
                model, calib, self.device, router_mode=router_mode, reference=reference)
        return evaluator.fitness(plans)

    def release(self, key: int) -> tuple[int, int]:
        """Drop a search's evaluator; (evaluations, cache hits) it made here."""
        evaluator = self.evaluators.pop(key, None)
        return (0, 0) if evaluator is None else (evaluator.evaluations, evaluator.cache_hits)


@dataclass
class _Slot:
    cpus: int
    gpus: float
    node: str | None
    device: str
    actor: object = None
    generation: int = 0  # how many actors this slot has had
    busy: int = 0  # pieces of work sent to the current actor and not yet collected


@dataclass
class _Ticket:
    """One piece of work: how to send it, where it went."""

    method: str
    args: tuple
    slot: int = -1
    generation: int = -1
    ref: object = None
    tries: int = 0


class RayEngine(Engine):
    name = "ray"
    distributed = True

    def __init__(self, address: Address, device: str | None = None):
        super().__init__(device or "auto")
        self.address = address
        self.temp_dir: str | None = None
        self.slots: list[_Slot] = []
        self.replaced = 0
        self.retried = 0
        self.payload_bytes = 0  # plans sent and fitness values returned, pickled
        self._keys = itertools.count()
        try:
            self._connect()
            self.slots = self._plan(device)
            for slot in self.slots:
                self._start(slot)
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> int:
        return len(self.slots)

    # ------------------------------------------------------------------ cluster
    def _connect(self) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports leave this machine
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                     namespace="moecompile")
        if ray.is_initialized():
            raise UserError("--ray: this process is already connected to a Ray cluster")
        if self.address.local:
            n = self.address.workers
            per = max(1, (os.cpu_count() or 1) // n)
            self.temp_dir = tempfile.mkdtemp(prefix="moecompile-ray-", dir=_short_tmp())
            ray.init(num_cpus=n * per, _temp_dir=self.temp_dir, _node_ip_address="127.0.0.1",
                     **quiet)
            return
        try:
            ray.init(address=self.address.text if self.address.host is None
                     else f"{self.address.host}:{self.address.port}", **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"--ray {self.address.text}: cannot join a Ray cluster there "
                            f"({str(exc).splitlines()[0]})") from None

    def _plan(self, device: str | None) -> list[_Slot]:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        slots: list[_Slot] = []
        if self.address.local:
            n = self.address.workers
            res = nodes[0]["Resources"]
            gpus = float(res.get("GPU", 0))
            share = min(1.0, gpus / n) if gpus else 0.0
            slots = [_Slot(int(res["CPU"]) // n, share, nodes[0]["NodeID"], "") for _ in range(n)]
        else:
            for node in nodes:
                res = node["Resources"]
                cpus, gpus = int(res.get("CPU", 0)), int(res.get("GPU", 0))
                if gpus:
                    slots += [_Slot(max(1, cpus // gpus) if cpus else 0, 1.0, node["NodeID"], "")
                              for _ in range(gpus)]
                elif cpus:
                    slots.append(_Slot(cpus, 0.0, node["NodeID"], ""))
        if not slots:
            raise UserError(f"--ray {self.address.text}: the cluster has no CPU or GPU for a worker")
        for slot in slots:
            if device is not None and device.startswith("cuda") and not slot.gpus:
                raise UserError(f"--device {device}: a Ray worker has no GPU")
            slot.device = device or ("cuda" if slot.gpus else "cpu")
        return slots

    def _start(self, slot: _Slot) -> None:
        options = dict(num_cpus=slot.cpus, num_gpus=slot.gpus, max_restarts=0,
                       max_concurrency=1)
        if slot.node is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(slot.node, soft=False)
        slot.actor = ray.remote(Worker).options(**options).remote(max(1, slot.cpus), slot.device)
        slot.generation += 1
        slot.busy = 0

    def _wait_ready(self) -> None:
        refs = [slot.actor.info.remote() for slot in self.slots]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=READY_SECONDS)
        if len(ready) < len(refs):
            raise UserError(f"--ray {self.address.text}: {len(refs) - len(ready)} of "
                            f"{len(refs)} workers could not start within {READY_SECONDS} s "
                            "(is the cluster busy?)")
        try:
            self.infos = ray.get(refs)
        except _DIED + (ray.exceptions.RayTaskError,) as exc:
            raise UserError(f"--ray {self.address.text}: a worker could not start "
                            f"({str(exc).splitlines()[0]}); every node needs moecompile "
                            "installed in the same Python environment") from None

    def worker_pids(self) -> list[int]:
        """The process id of each worker (for whoever must find them: tests, tools)."""
        return [info["pid"] for info in ray.get([s.actor.info.remote() for s in self.slots])]

    def describe(self) -> str:
        where = ("a local cluster (127.0.0.1)" if self.address.local
                 else f"the cluster at {self.address.text}")
        devices = sorted({s.device for s in self.slots})
        hosts = len({info["host"] for info in self.infos})
        return (f"ray: {self.workers} workers on {where}, {hosts} node(s), device "
                f"{'/'.join(devices)}, {self.slots[0].cpus} CPU(s) each")

    # ------------------------------------------------------------------ work
    def _send(self, ticket: _Ticket, slot_index: int | None = None) -> _Ticket:
        if slot_index is None:
            slot_index = min(range(len(self.slots)), key=lambda i: (self.slots[i].busy, i))
        slot = self.slots[slot_index]
        ticket.slot, ticket.generation = slot_index, slot.generation
        ticket.ref = getattr(slot.actor, ticket.method).remote(*ticket.args)
        slot.busy += 1
        return ticket

    def _collect(self, ticket: _Ticket):
        """The ticket's result; a dead worker is replaced and the work sent again."""
        while True:
            try:
                value = ray.get(ticket.ref)
            except _DIED as exc:
                self._done(ticket)
                slot = self.slots[ticket.slot]
                if slot.generation == ticket.generation:  # not replaced yet
                    ray.kill(slot.actor, no_restart=True)
                    self._start(slot)
                    self.replaced += 1
                ticket.tries += 1
                if ticket.tries > RETRIES:
                    raise UserError(f"a Ray worker died {ticket.tries} times running one piece "
                                    f"of work ({type(exc).__name__}); giving up") from None
                self.retried += 1
                self._send(ticket)
                continue
            except ray.exceptions.RayTaskError as exc:
                self._done(ticket)
                cause = exc.cause if isinstance(exc.cause, BaseException) else None
                raise (cause or exc) from None
            self._done(ticket)
            return value

    def _done(self, ticket: _Ticket) -> None:
        slot = self.slots[ticket.slot]
        if slot.generation == ticket.generation and slot.busy > 0:
            slot.busy -= 1

    def map(self, task, shared, shards) -> list:
        ref = ray.put(shared)
        tickets = [self._send(_Ticket("run", (task, ref, shard)), i % len(self.slots))
                   for i, shard in enumerate(shards)]
        self.tasks += len(shards)
        return [self._collect(t) for t in tickets]

    def candidates(self, model, calib, router_mode: str = "onehot", reference=None):
        scorer = RayCandidates(self, model, calib, router_mode, reference)
        self.scorers.append(scorer)
        return scorer

    def report(self) -> dict:
        out = super().report()
        out.update({"address": self.address.text, "devices": sorted({s.device for s in self.slots}),
                    "replaced_workers": self.replaced, "resent": self.retried})
        if self.scorers:
            n = sum(s.evaluations for s in self.scorers)
            out["bytes_per_candidate"] = round(self.payload_bytes / max(n, 1))
        return out

    def close(self) -> None:
        for scorer in self.scorers:
            try:
                scorer.close()
            except Exception:  # noqa: BLE001 - closing must go on
                pass
        for slot in self.slots:
            if slot.actor is not None:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
                slot.actor = None
        if ray.is_initialized():
            ray.shutdown()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


class RayCandidates:
    """EEP's scorer on Ray (analysis/eep.py `Scorer`): two candidates in flight per worker, so
    that each worker has its next candidate queued when it finishes one instead of waiting
    for the driver's round trip (measured on the bundled model, 2 workers on 2 idle cores:
    search 5.5 s with one in flight per worker, in-process 4.1 s)."""

    def __init__(self, engine: RayEngine, model, calib, router_mode: str, reference=None):
        self.engine = engine
        self.key = next(engine._keys)
        # nested in a list: fetched on first use
        self.refs = [ray.put(model), ray.put(calib), ray.put(reference)]
        self.router_mode = router_mode
        self.submitted = 0
        self.evaluations = self.cache_hits = 0
        self.closed = False

    @property
    def parallel(self) -> int:
        return IN_FLIGHT_PER_WORKER * self.engine.workers

    def submit(self, plans) -> _Ticket:
        self.submitted += 1
        self.engine.payload_bytes += len(pickle.dumps(plans)) + 8
        return self.engine._send(_Ticket("score", (self.key, self.refs, self.router_mode, plans)))

    def result(self, ticket: _Ticket) -> float:
        return self.engine._collect(ticket)

    def cancel(self, ticket: _Ticket) -> None:
        self.engine._done(ticket)

    def score(self, plans) -> float:
        return self.result(self.submit(plans))

    def close(self) -> None:
        """Free the workers' evaluators; count what they did."""
        if self.closed:
            return
        self.closed = True
        refs = [s.actor.release.remote(self.key) for s in self.engine.slots if s.actor is not None]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=30)
        for ref in ready:
            try:
                evaluations, hits = ray.get(ref)
            except _DIED:
                continue
            self.evaluations += evaluations
            self.cache_hits += hits


def _short_tmp() -> str:
    """A temporary folder short enough for Ray's socket paths (107 bytes on Linux)."""
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) <= 40 else "/tmp"

