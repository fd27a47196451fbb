"""The layers run one way: exporters never import passes, passes reach a target only through
the Target interface, nothing in the library imports the command line, and tools import the
installed package instead of editing sys.path."""

import ast
from pathlib import Path

import pytest

from moecompile.testing.models import REPO


def imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved in its package)."""
    package = {"moecompile": "moecompile", "passes": "moecompile.passes",
               "exporters": "moecompile.exporters"}[path.relative_to(REPO).parts[0]]
    inner = path.relative_to(REPO).parts[1:-1]
    here = ".".join([package, *inner])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = here.split(".")[:len(here.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}
    return out


def files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", files("exporters"), ids=lambda p: str(p.relative_to(REPO)))
def test_exporters_never_import_passes(path):
    assert not [m for m in imports(path) if m.startswith("moecompile.passes")]


@pytest.mark.parametrize("path", files("passes"), ids=lambda p: str(p.relative_to(REPO)))
def test_passes_import_no_exporter(path):
    assert not [m for m in imports(path) if m.startswith("moecompile.exporters")]


@pytest.mark.parametrize("path", files("moecompile") + files("passes") + files("exporters"),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_in_the_library_imports_the_command_line(path):
    if path == REPO / "moecompile" / "cli.py":
        return
    assert not [m for m in imports(path) if m.startswith("moecompile.cli")]


@pytest.mark.parametrize("path", files("tools"), ids=lambda p: p.name)
def test_tools_do_not_edit_sys_path(path):
    """Tools run against the installed package (scripts they generate for third-party code
    may do what that code needs)."""
    calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)
             and n.attr in ("insert", "append") and ast.unparse(n.value) == "sys.path"]
    assert not calls
