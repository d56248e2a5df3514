"""The import structure, read from the sources with `ast`: the command line has no import cycle and no import
inside a function to dodge one; nothing outside prmkern/cli/ imports the command line; the engine imports neither
the API (prmkern.llm) nor the command line; distributed/ holds tensor parallelism only."""
from __future__ import annotations

import ast
import os

import prmkern

ROOT = os.path.dirname(prmkern.__file__)
# imports a function may make: optional extras (FastAPI and uvicorn for `prmkern serve`, matplotlib for
# `prmkern report`), not cycles
OPTIONAL = {"uvicorn", "prmkern.serve.app", "prmkern.serve.connections", "prmkern.report"}


def _modules() -> dict[str, str]:
    out = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(path: str, module: str) -> tuple[set[str], set[str]]:
    """(modules imported at the top level, modules imported inside functions), prmkern's only."""
    tree = ast.parse(open(path).read())
    top, inner = set(), set()
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]

    def names(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
        return [base] + [f"{base}.{a.name}" for a in node.names]

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (inner if in_function else top).update(n for n in names(child)
                                                       if n.startswith("prmkern") or n.split(".")[0] in OPTIONAL)
            visit(child, fn)
    visit(tree, False)
    return top, inner


MODULES = _modules()
IMPORTS = {m: _imports(p, m) for m, p in MODULES.items()}


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_the_command_line_has_no_cycle_and_no_import_inside_a_function():
    cli = {m for m in MODULES if m.startswith("prmkern.cli")}
    graph = {m: {_resolve(n) for n in IMPORTS[m][0]} & cli - {m} for m in cli}
    for m in cli:
        inner = {n for n in IMPORTS[m][1] if not any(n == o or n.startswith(o + ".") for o in OPTIONAL)}
        assert not inner, f"{m} imports {sorted(inner)} inside a function"
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(graph[m] - {"prmkern.cli"}):  # the package's __init__ re-exports main
            visit(n, path + [m])
        state[m] = 2
    for m in sorted(cli):
        visit(m, [])


def test_nothing_below_the_command_line_imports_it():
    for m, (top, inner) in IMPORTS.items():
        if m.startswith("prmkern.cli") or m == "prmkern.__main__":
            continue
        up = {n for n in top | inner if n.startswith("prmkern.cli")}
        assert not up, f"{m} imports the command line: {sorted(up)}"


def test_the_engine_does_not_import_the_api_or_the_command_line():
    for m, (top, inner) in IMPORTS.items():
        if m.startswith("prmkern.engine") or m.startswith("prmkern.models") or m.startswith("prmkern.attention"):
            up = {n for n in top | inner if n.startswith(("prmkern.llm", "prmkern.cli", "prmkern.serve"))}
            assert not up, f"{m} imports upwards: {sorted(up)}"


def test_distributed_holds_tensor_parallelism_only():
    names = {m.rsplit(".", 1)[1] for m in MODULES if m.startswith("prmkern.distributed.")}
    assert names == {"executor", "sharding", "tp_engine", "worker"}
