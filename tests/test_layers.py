"""The package layout is the architecture: each layer imports only the layers below it, and
the core imports no Trio, no sockets and no I/O library (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import relay_trio

PACKAGE = Path(relay_trio.__file__).parent

#: Lower number = lower layer. A module may import its own layer and any lower one.
LAYERS = {
    "core": 0,
    "stores": 1,
    "upstreams": 1,
    "sinks": 1,
    "metrics": 1,
    "tracing": 1,
    "logs": 1,
    "systemd": 1,
    "services": 2,
    "cluster": 2,
    "http": 3,
    "stream": 3,
    "relay": 4,
    "server": 5,
    "shutdown": 5,
    "client": 5,
    "cli": 6,
    "cli_deadletters": 6,
    "__init__": 7,
    "__main__": 7,
}
#: What the sans-I/O core may never import (directly or through the package).
IO_MODULES = {"trio", "trio_util", "socket", "httpx", "hypercorn", "quart", "quart_trio", "sqlite3"}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def runtime_imports(path: Path) -> tuple[set[str], set[str]]:
    """(package layers, third-party top-level modules) imported outside ``TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            guarded.update(id(n) for n in ast.walk(node))
    rel = path.relative_to(PACKAGE)
    here = list(rel.parts[:-1])
    layers: set[str] = set()
    external: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
                if parts:
                    layers.add(parts[0])
                else:  # ``from .. import __version__``: package metadata, not a layer
                    layers.update(a.name for a in node.names if a.name != "__version__")
            elif node.module and node.module.startswith("relay_trio"):
                layers.add(node.module.split(".")[1] if "." in node.module else "__init__")
            elif node.module:
                external.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            external.update(alias.name.split(".")[0] for alias in node.names)
    return layers, external


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_its_layer_and_below(path: Path) -> None:
    layer = layer_of(path)
    assert layer in LAYERS, f"{layer} is not in the layer map"
    layers, external = runtime_imports(path)
    above = {other for other in layers if LAYERS.get(other, 99) > LAYERS[layer]}
    assert not above, f"{path.name} ({layer}) imports from higher layers: {above}"
    if layer == "core":
        assert not external & IO_MODULES, f"core module {path.name} imports {external & IO_MODULES}"


def test_no_module_is_long_without_saying_why() -> None:
    long = []
    for path in modules():
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > 450 and "Longer than" not in doc:
            long.append(f"{path.relative_to(PACKAGE)} ({lines} lines)")
    assert not long, long
