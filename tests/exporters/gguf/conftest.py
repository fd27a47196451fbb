"""Fixtures of the GGUF target's tests."""

import pytest


@pytest.fixture
def smallest_budget(tiny_model):
    """`smallest_budget(fraction)`: (folder, model, budget) of a tiny Mixtral whose experts are
    256 wide, the budget `fraction` of its all-Q2_K weights plus what --ctx 128 needs beside
    them (below 1: no types alone fit, a structure must go)."""
    from moecompile import frontend
    from moecompile.exporters.gguf.memory import context_bytes
    from moecompile.exporters.gguf.target import GGUFTarget
    from moecompile.exporters.target import TypeRequest
    from moecompile.passes.base import PassContext

    def make(fraction: float):
        folder = tiny_model("mixtral", hidden_size=256, intermediate_size=256)
        model = frontend.load(folder)
        smallest = GGUFTarget().choose_types(model, TypeRequest(quant="q2_k"),
                                             PassContext()).weight_bytes
        return folder, model, context_bytes(model, 128) + int(fraction * smallest)
    return make
