"""Targets: one per runtime, behind one interface (exporters/target.py).

    target = target_for("gguf")            # or "onnx"
    plan = target.choose_types(model, TypeRequest(quant="q4_k"), ctx)
    committed = target.commit(plan, Path("out/m.gguf"))

Each target says what its runtime can run faithfully (and refuses the rest with the reason),
which weight types it offers and what they cost, the runtime's memory, how a file is written
and run, and which numbers the runtime computes with, so the file is verified against what it
should compute.
"""

from __future__ import annotations


def target_for(name: str):
    """The Target for --target NAME."""
    if name == "gguf":
        from .gguf.target import GGUFTarget

        return GGUFTarget()
    if name == "onnx":
        from .onnx.target import ONNXTarget

        return ONNXTarget()
    raise ValueError(f"unknown target {name!r}")
