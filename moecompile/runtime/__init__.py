"""Reference execution of the IR in torch."""

from .executor import ReferenceExecutor, default_device

__all__ = ["ReferenceExecutor", "default_device"]
