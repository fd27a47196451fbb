"""A real local Ray cluster (127.0.0.1, two workers) shared by a test module, shut down after
it; skipped only where Ray is not installed (`.ci/run` installs it with the test extra)."""

import pytest


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
