"""What `--ray ADDRESS` may say, checked before any model is read.

- `local:N`: start a Ray cluster on this machine for this run, with N workers, and shut it
  down at the end;
- `auto`: join the cluster `ray start --head` started on this machine (or RAY_ADDRESS);
- `HOST:PORT`: join the cluster whose head listens there (`ray start --head` prints it).

A head that does not answer is one line and exit 2: Ray itself would wait minutes for it, so
the port is probed first.
"""

from __future__ import annotations

import importlib.util
import socket
from dataclasses import dataclass

from moecompile.errors import UserError

PROBE_SECONDS = 5.0
INSTALL = "pip install 'moecompile[distributed]'"


@dataclass(frozen=True)
class Address:
    text: str  # as given
    workers: int | None = None  # local:N
    host: str | None = None  # HOST:PORT
    port: int | None = None

    @property
    def local(self) -> bool:
        return self.workers is not None


def parse_address(text: str) -> Address:
    """`local:N` (N >= 1), `auto` or `HOST:PORT`; UserError for anything else."""
    t = text.strip()
    usage = (f"--ray '{text}': expected local:N (start a local cluster with N workers), auto "
             "(the cluster running on this machine) or HOST:PORT (its head node)")
    if t == "auto":
        return Address(t)
    if t.startswith("local:"):
        n = t[len("local:"):]
        if not n.isdigit() or int(n) < 1:
            raise UserError(usage)
        return Address(t, workers=int(n))
    host, sep, port = t.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or " " in host:
        raise UserError(usage)
    return Address(t, host=host.strip("[]"), port=int(port))


def require_ray() -> None:
    """UserError when Ray is not installed (the core runs without it)."""
    if importlib.util.find_spec("ray") is None:
        raise UserError(f"--ray needs Ray, which is not installed: {INSTALL}")


def probe(address: Address, seconds: float = PROBE_SECONDS) -> None:
    """UserError unless something accepts connections at HOST:PORT."""
    if address.host is None:
        return
    try:
        socket.create_connection((address.host, address.port), timeout=seconds).close()
    except OSError as exc:
        raise UserError(f"--ray {address.text}: no Ray head answers there ({exc.strerror or exc}); "
                        "start one with `ray start --head` and give the address it prints") from None
