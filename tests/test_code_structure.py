"""The code's shape, read from its syntax trees: short functions, and the package boundary.

- No function over `MAX_LINES` lines in the code that ships or runs in deployment (`isomax/`,
  `service/`, `training/`, `scripts/`); tests and benchmarks are outside the rule. A function's
  length runs from its `def` line to its last line, docstring and nested functions included.
- The installed package never imports the test tree (the server harness lives in `tests/`).
- Code outside the tests imports from `isomax.contract` only the names each module lists in
  `__all__`: the contract's public part is the few names callers need.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
CHECKED = ("isomax", "service", "training", "scripts")
PACKAGES = ("isomax", "service", "training")  # what the wheel ships (pyproject.toml)


def _sources(*tops: str) -> Iterator[tuple[str, ast.Module]]:
    for top in tops:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def _functions(
    node: ast.AST, prefix: str = ""
) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function under `node`, methods and nested ones too."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + child.name, child
            yield from _functions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")
        else:
            yield from _functions(child, prefix)


def long_functions() -> dict[str, int]:
    """`file::qualified.name` -> lines, for every checked function over `MAX_LINES`."""
    found = {}
    for rel, tree in _sources(*CHECKED):
        for name, fn in _functions(tree):
            lines = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if lines > MAX_LINES:
                found[f"{rel}::{name}"] = lines
    return found


def test_no_function_over_the_limit() -> None:
    found = long_functions()
    assert not found, f"functions over {MAX_LINES} lines (split them): {found}"


def test_the_length_rule_sees_a_long_function() -> None:
    """The walk finds methods and nested functions and counts their lines as written."""
    body = "\n".join(f"            x{i} = {i}" for i in range(MAX_LINES))
    tree = ast.parse(f"class A:\n    def f(self):\n        def g():\n{body}\n")
    (name, fn), (inner, _) = list(_functions(tree))[:2]
    assert (name, inner) == ("A.f", "A.f.g")
    assert fn.end_lineno is not None and fn.end_lineno - fn.lineno + 1 == MAX_LINES + 2


def _imported_modules(tree: ast.Module) -> Iterator[tuple[str, list[str]]]:
    """(module, imported names) of every import in `tree`; `import x` gives (x, [])."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_the_installed_package_does_not_import_the_tests() -> None:
    found = [
        f"{rel}: {module}"
        for rel, tree in _sources(*PACKAGES)
        for module, _ in _imported_modules(tree)
        if module == "tests" or module.startswith("tests.")
    ]
    assert not found, f"the shipped packages import the test tree: {found}"


def test_callers_use_only_the_contracts_public_names() -> None:
    """What `isomax`, `service`, `training`, `scripts` and `bench` take from the contract."""
    outside = []
    for rel, tree in _sources(*CHECKED, "bench"):
        for module, names in _imported_modules(tree):
            if not module.startswith("isomax.contract.") or rel.startswith("isomax/contract/"):
                continue
            public = set(importlib.import_module(module).__all__)
            outside += [f"{rel}: {module}.{n}" for n in names if n not in public]
    assert not outside, f"names outside the contract's __all__: {outside}"
