"""The house rules, read from the code's own imports (docs/architecture.md).

1. The product (``chaid``) imports neither the lab (``chaid_lab``) nor the client.
2. The client (``chai_client``) imports nothing of ``chaid``.
3. Product layers import only their own layer or lower ones; the components (store,
   models, kernels, video) do not import each other.
4. No import cycles among the product's modules.

Every import counts: at module level, inside functions, and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Product layers, highest first. A module belongs to the first layer with a prefix of it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry", ("chaid.cli", "chaid.__main__", "chaid.local")),
    ("server", ("chaid.server",)),
    ("protocol", ("chaid.protocol",)),
    ("engine", ("chaid.engine",)),
    ("settings", ("chaid.config", "chaid.modes")),
    ("components", ("chaid.store", "chaid.models", "chaid.kernels", "chaid.video")),
    ("base", ("chaid.limits", "chaid.checks", "chaid.errors", "chaid")),
]
# Within this layer each top-level package stands alone.
INDEPENDENT = "components"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path, known: set[str]) -> set[str]:
    """Modules ``path`` imports, resolved to the most specific known module."""
    mod = module_name(root, path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from a import b` imports a.b when that is a module, else a name of a.
            names = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem
                     for alias in node.names]
        else:
            continue
        out.update(names)
    return out


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    files = [p for pkg in packages for p in (root / pkg).rglob("*.py")]
    known = {module_name(root, p) for p in files}
    return {module_name(root, p): imports_of(root, p, known) for p in files}


def layer_of(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def component_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def layer_violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Imports from a lower layer up, between independent components, or of the lab or
    the client from the product."""
    problems = []
    for mod, targets in sorted(graph.items()):
        own = layer_of(mod)
        for target in sorted(targets):
            top = target.split(".")[0]
            if top in ("chaid_lab", "chai_client"):
                problems.append(f"{mod} imports {target}: the product never imports {top}")
                continue
            if top != "chaid":
                continue
            theirs = layer_of(target)
            if own is None or theirs is None:
                problems.append(f"{mod} -> {target}: a module outside every layer")
            elif theirs < own:
                problems.append(f"{mod} ({LAYERS[own][0]}) imports {target} "
                                f"({LAYERS[theirs][0]}), a higher layer")
            elif (theirs == own and LAYERS[own][0] == INDEPENDENT
                  and component_of(mod) != component_of(target)):
                problems.append(f"{mod} imports {target}: components stay independent")
    return problems


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing
    itself), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def product() -> dict[str, set[str]]:
    return import_graph(REPO, ["chaid"])


def test_every_product_module_has_a_layer(product):
    assert [m for m in product if layer_of(m) is None] == []


def test_product_layers_hold(product):
    assert layer_violations(product) == []


def test_product_has_no_import_cycles(product):
    # A package's __init__ importing its own modules is not a cycle unless they import
    # the package back; the graph resolves `from pkg import mod` to the module itself.
    assert cycles(product) == []


def test_client_does_not_import_the_product():
    client = import_graph(REPO / "client", ["chai_client"])
    assert [(m, t) for m, ts in client.items() for t in ts
            if t.split(".")[0] in ("chaid", "chaid_lab")] == []


def test_the_lab_sits_beside_the_product():
    assert not (REPO / "chaid" / "shapes").exists()
    lab = import_graph(REPO / "lab", ["chaid_lab"])
    assert lab, "the lab package is missing"
    assert any(t.startswith("chaid.") for ts in lab.values() for t in ts)


def test_the_checks_catch_what_they_guard():
    """The rules fail on a graph that breaks them (so a passing run means something)."""
    bad = {
        "chaid.store.cache": {"chaid.engine.chai", "chaid.models.stdit3"},
        "chaid.engine.chai": {"chaid.store.cache", "chaid_lab.shapes.judge"},
        "chaid.models.stdit3": set(),
        "chaid.server.a": {"chaid.server.b"},
        "chaid.server.b": {"chaid.server.a"},
    }
    problems = layer_violations(bad)
    assert any("chaid.store.cache (components) imports chaid.engine.chai" in p
               for p in problems)
    assert any("components stay independent" in p for p in problems)
    assert any("never imports chaid_lab" in p for p in problems)
    assert sorted(map(tuple, cycles(bad))) == [("chaid.engine.chai", "chaid.store.cache"),
                                               ("chaid.server.a", "chaid.server.b")]
