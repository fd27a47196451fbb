"""The pass contract and the manager that runs passes in order.

Modelled on onnx-ir's passes: a pass has a name, states what it requires of the IR and what it
ensures, and returns a `PassResult` (the new model, whether it changed it, its report). The
`PassManager` runs passes in order, verifies the IR after each, records each pass that changed
the model in its history, and names the pass when the IR it left is broken: that is a bug of
the pass (exit 3), not bad input.

What passes share comes in a `PassContext`: the device, the seed, whether to show progress,
the calibration data, built once per job on first use (`calibration()`), and the engine that
runs their independent work — candidates of a search, token shards of a calibration pass —
in this process or on Ray workers (moecompile/distributed/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from moecompile import ir
from moecompile.analysis.calibration import CalibSet
from moecompile.distributed.engine import Engine
from moecompile.errors import InternalError, UserError


@dataclass(frozen=True)
class PassResult:
    model: ir.Model
    changed: bool
    report: dict


@dataclass
class PassContext:
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    # the calibration set, or how to build it for a model (called at most once)
    calib: CalibSet | None = None
    calibrate: Callable[[ir.Model], CalibSet] | None = field(default=None, repr=False)
    # the user gave it (--calib): optional uses (an importance matrix for fixed types) take it
    explicit: bool = True
    engine: Engine | None = None  # None: this process

    def __post_init__(self):
        if self.engine is None:
            self.engine = Engine(self.device)

    @property
    def has_calibration(self) -> bool:
        """Is there calibration data for optional uses, i.e. did the user give some?"""
        return self.explicit and (self.calib is not None or self.calibrate is not None)

    def calibration(self, model: ir.Model, needed_by: str) -> CalibSet:
        """The job's calibration set, built on first use. Its tokens depend only on the
        tokenizer, which no pass changes, so every pass of a job sees the same set."""
        if self.calib is None:
            if self.calibrate is None:
                raise UserError(f"{needed_by} needs calibration data: --calib TASKS (e.g. "
                                "add,sort or all), --calib FILE.jsonl or --calib FILE.txt")
            self.calib = self.calibrate(model)
        return self.calib


class Pass:
    """One IR -> IR step. Subclasses set `name`, `requires` and `ensures` (one line each,
    for reports and for whoever reads the pipeline) and implement `run`."""

    name: str = ""
    requires: str = ""
    ensures: str = ""

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def summary(self, report: dict) -> str | None:
        """The one line the job prints for this pass's result (None: nothing to say)."""
        return None


def apply(p: Pass, model: ir.Model, calib: CalibSet | str | None = None, calib_n: int = 32,
          device: str = "cpu", seed: int = 0, progress: bool = False,
          engine: Engine | None = None) -> tuple[ir.Model, dict]:
    """Run one pass through the manager (verified, recorded in the history when it changed
    the model): the Python API. `calib` is a calibration set or a --calib spec; `engine` (e.g.
    a RayEngine) runs its independent work, this process by default."""
    from moecompile.analysis.calibration import build_calib

    if isinstance(calib, str):
        calib = build_calib(model, calib, calib_n)
    ctx = PassContext(device=device, seed=seed, progress=progress, calib=calib, engine=engine)
    model, done = PassManager([p]).run(model, ctx)
    return model, done[0][1].report


class PassManager:
    def __init__(self, passes: list[Pass]):
        self.passes = passes

    def run(self, model: ir.Model, ctx: PassContext) -> tuple[ir.Model, list[tuple[Pass, PassResult]]]:
        done = []
        for p in self.passes:
            result = p.run(model, ctx)
            try:
                ir.verify(result.model)
            except ir.IRError as exc:
                raise InternalError(f"pass {p.name} left an invalid IR: {exc}") from None
            if result.changed:
                model = result.model.with_history(result.report)
            done.append((p, result))
        return model, done
