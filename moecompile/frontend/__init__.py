"""Frontend: Hugging Face checkpoint folder → IR, reading headers only."""

from __future__ import annotations

from pathlib import Path

from ..ir import Model
from .archs import FAMILIES, SUPPORTED, build_model
from .checkpoint import Checkpoint, open_checkpoint

__all__ = ["load", "open_checkpoint", "Checkpoint", "FAMILIES", "SUPPORTED"]


def load(path: str | Path) -> Model:
    """Open a checkpoint folder and describe it as a (lazy, verified) IR model."""
    return build_model(open_checkpoint(path))
