"""The layout's promises, checked on the source: no import cycles between modules, and the arrows between the
packages and subpackages point the way the architecture says (ltu_as never imports daemon; the model never
imports loading, serving or training; the delivery layer never reaches into the service; clients import
neither package)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ltu_as", "daemon", "clients")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Modules of our packages that `path` imports at run time (anywhere in the file, lazily too; not the ones
    under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            out.update(n if n in MODULES else target for n in names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES and m != here}


FILES = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
MODULES = {module_name(p) for p in FILES}
GRAPH = {module_name(p): {m for m in imports(p) if m in MODULES} for p in FILES}


def test_no_import_cycles() -> None:
    # package __init__ files that only hold a docstring or lazy exports are not part of a cycle
    graph = {
        m: {d for d in deps if not (REPO / d.replace(".", "/") / "__init__.py").is_file()} for m, deps in GRAPH.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " → ".join([*stack[stack.index(d) :], d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [
        ("ltu_as", ("daemon", "clients")),
        ("clients", ("daemon", "ltu_as")),
        ("ltu_as.model", ("ltu_as.loading", "ltu_as.serving", "ltu_as.training")),
        ("ltu_as.loading", ("ltu_as.serving", "ltu_as.training")),
        ("daemon.delivery", ("daemon.service", "daemon.stream", "daemon.understanding", "daemon.speech")),
        ("daemon.capture", ("daemon.service", "daemon.stream", "daemon.understanding", "daemon.speech")),
        ("daemon.understanding", ("daemon.service", "daemon.stream", "daemon.speech")),
        ("daemon.speech", ("daemon.service", "daemon.stream", "daemon.understanding")),
    ],
)
def test_arrows_point_one_way(importer: str, forbidden: tuple[str, ...]) -> None:
    bad = sorted(
        f"{m} imports {d}"
        for m, deps in GRAPH.items()
        if m == importer or m.startswith(importer + ".")
        for d in deps
        if any(d == f or d.startswith(f + ".") for f in forbidden)
    )
    assert not bad, bad


def test_the_graph_is_read() -> None:  # the checks above would pass on an empty graph
    assert "daemon.delivery.protocol" in GRAPH["daemon.delivery.server"]
    assert "ltu_as.model.modeling" in GRAPH["ltu_as.loading.load"]
    assert "daemon.understanding.desk" in GRAPH["daemon.service"]  # a lazy import counts
