"""The package layout's import direction (docs/development.md): every
import in batchdet/, at any depth, goes from a layer to the same or a lower
one, and no chain of imports between modules comes back to where it started."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import batchdet

PACKAGE = Path(batchdet.__file__).resolve().parent

#: Lowest first; a module may import from its own layer and the ones before it.
#: An entry is a module or a package (all its modules); the longest entry that
#: names a module decides its layer.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("helpers", ("batchdet", "batchdet.errors", "batchdet.files", "batchdet.storage", "batchdet.progress",
                 "batchdet.console", "batchdet.cpu")),
    ("model", ("batchdet.model",)),
    ("output", ("batchdet.output",)),
    ("options", ("batchdet.options", "batchdet.config")),
    ("pipeline", ("batchdet.pipeline",)),
    # what composes the pipeline: the Python API, `batchdet demo`, quantization
    # (calibrates on images read and prepared as a run does), `submit` and
    # `verify` (re-detects rows of an output)
    ("commands", ("batchdet.api", "batchdet.demo", "batchdet.model.quantize", "batchdet.cluster",
                  "batchdet.verify")),
    ("cli", ("batchdet.cli",)),
    ("job", ("batchdet.cluster.job",)),  # the cluster's entrypoint wraps the CLI
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """Index in LAYERS; the package root only names batchdet/__init__.py."""
    matches = [(len(entry), i) for i, (_, entries) in enumerate(LAYERS) for entry in entries
               if module == entry or (entry != "batchdet" and module.startswith(entry + "."))]
    if not matches:
        raise LookupError(f"{module} is in no layer of tests/test_layout.py's LAYERS: place it")
    return max(matches)[1]


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The batchdet modules ``module`` imports, anywhere in the file (a
    function-local import is an edge too). ``from pkg import name`` is the
    module ``pkg.name`` when that is one, else ``pkg``."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".")[: len(module.split(".")) - (0 if is_package else 1)]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, base] if base else here)
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in found if m in known and m != module}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {m: imports(m, p, set(found)) for m, p in found.items()}


def wrong_way(edges: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
            for m, deps in sorted(edges.items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]


def cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path that ends where it starts, or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_imports_go_down_the_layers():
    assert wrong_way(graph()) == []


def test_no_import_cycle():
    assert cycle(graph()) == [], " → ".join(cycle(graph()))


def test_the_checks_catch_what_they_are_for():
    """A wrong-way import and a cycle, inserted into the real graph, are found."""
    edges = graph()
    edges["batchdet.model.spec"] = edges["batchdet.model.spec"] | {"batchdet.pipeline.run"}
    assert wrong_way(edges) == ["batchdet.model.spec (model) imports batchdet.pipeline.run (pipeline)"]
    assert cycle(edges)[0] == cycle(edges)[-1]


@pytest.mark.parametrize("source, module, expected", [
    ("from batchdet.model import spec", "batchdet.api", {"batchdet.model.spec"}),
    ("from batchdet.model.spec import STANDIN", "batchdet.api", {"batchdet.model.spec"}),
    ("def f():\n    import batchdet.pipeline.run", "batchdet.api", {"batchdet.pipeline.run"}),
    ("from . import layout", "batchdet.output.schema", {"batchdet.output.layout"}),
    ("from ..model.spec import MEAN", "batchdet.output.schema", {"batchdet.model.spec"}),
])
def test_imports_are_read_at_any_depth(tmp_path, source, module, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imports(module, path, set(modules())) == expected
