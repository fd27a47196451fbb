"""A real local Ray cluster (127.0.0.1, two workers) shared by a test module, shut down after
it; skipped only where Ray is not installed (`.ci/run` installs it with the test extra)."""

import os

import pytest
import torch


@pytest.fixture(scope="module")
def ray_engine():
    pytest.importorskip("ray")
    from moecompile.distributed.address import parse_address
    from moecompile.distributed.ray_engine import RayEngine

    engine = RayEngine(parse_address("local:2"), "cpu")
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def like_a_worker():
    """`like_a_worker(fn)`: fn() in this process on as many threads as each worker of
    `local:2` has (one per core), since torch's kernels may sum in another order on another
    thread count (measured on an AVX-512 Xeon: a different last bit in block 1's inputs)."""
    def run(fn):
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)
    return run
