"""Which engine a job gets for `--ray ADDRESS`: the check made before any model is read, and
the engine opened for the job and closed on the way out. Apart from engine.py, so the base
engine never imports the Ray one (which builds on it) and the core never needs Ray."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from .address import parse_address, probe, require_ray
from .engine import Engine


def check(address: str | None) -> None:
    """Refuse a malformed --ray, or --ray without Ray installed (before any model is read)."""
    if address is None:
        return
    parse_address(address)
    require_ray()


@contextlib.contextmanager
def open_engine(address: str | None, device: str | None = None,
                say: Callable[[str], None] = lambda line: None) -> Iterator[Engine]:
    """The engine for `--ray ADDRESS` (None: this process) on `device` (None: a GPU where
    there is one), closed on the way out, also on Ctrl-C: a cluster it started is shut down
    and its files removed."""
    if address is None:
        from moecompile.runtime.executor import default_device

        engine = Engine(device or default_device())
    else:
        parsed = parse_address(address)
        require_ray()
        probe(parsed)
        from .ray_engine import RayEngine

        engine = RayEngine(parsed, device)
        say(engine.describe())
    try:
        yield engine
    finally:
        engine.close()

