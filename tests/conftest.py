"""Session fixtures: one tokenizer and one folder per distinct tiny model, shared by all tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecompile.testing.models import build_tiny_model, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The locally trained byte-level BPE tokenizer, trained once per session."""
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir):
    """Factory ``tiny_model(arch, **kwargs) -> Path`` building each distinct model once per session.

    Calls with the same ``arch`` and keyword arguments return the same folder,
    so tests must treat it as read-only. ``tokenizer_dir`` defaults to the
    session tokenizer.
    """
    cache: dict[tuple, Path] = {}

    def make(arch: str, **kwargs) -> Path:
        key = (arch, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in cache:
            kwargs.setdefault("tokenizer_dir", tokenizer_dir)
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = build_tiny_model(arch, out, **kwargs)
        return cache[key]

    return make
