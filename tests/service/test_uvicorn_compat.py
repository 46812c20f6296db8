"""service/http_protocol.py subclasses uvicorn's httptools protocol: fail loudly when it changes.

`LimitedHttpToolsProtocol` reads attributes uvicorn sets on the protocol (`self.loop`,
`self.cycle`, `self.flow`, ...), overrides parser callbacks and calls them through `super()`,
and changes fields of uvicorn's request/response cycle (`cycle.keep_alive`,
`cycle.disconnected`, ...). None of that is public API, so uvicorn is pinned below the next
minor release in pyproject.toml. On an upgrade, these tests name every internal that the
subclass relies on and that the new uvicorn no longer has; docs/architecture.md
("Upgrading uvicorn") says what else to check.

The names are read from the source itself (ast), so a new use of an internal is covered without
editing this file.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

import service.http_protocol as ours

SOURCE = Path(ours.__file__).read_text()
TREE = ast.parse(SOURCE)
SUBCLASS = next(
    n
    for n in ast.walk(TREE)
    if isinstance(n, ast.ClassDef) and n.name == "LimitedHttpToolsProtocol"
)


def _assigned_on_self(cls: type) -> set[str]:
    """Every `self.X = ...` (or annotated) in the class's own methods, plus its class attributes."""
    names = set(vars(cls))
    tree = ast.parse(inspect.getsource(cls))
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for t in targets:
            if (
                isinstance(t, ast.Attribute)
                and isinstance(t.value, ast.Name)
                and t.value.id == "self"
            ):
                names.add(t.attr)
    return names


def _base_names() -> set[str]:
    names: set[str] = set()
    for cls in HttpToolsProtocol.__mro__:
        if cls is not object:
            names |= (
                _assigned_on_self(cls) if cls.__module__.startswith("uvicorn") else set(dir(cls))
            )
    return names


def _self_attributes(node: ast.AST) -> set[str]:
    return {
        n.attr
        for n in ast.walk(node)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
    }


def test_every_protocol_internal_the_subclass_reads_still_exists() -> None:
    own = {
        n.name for n in SUBCLASS.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    } | {
        t.attr
        for n in ast.walk(SUBCLASS)
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }
    inherited = _self_attributes(SUBCLASS) - own
    missing = sorted(inherited - _base_names())
    assert not missing, (
        f"uvicorn's HttpToolsProtocol no longer has {missing}, which service/http_protocol.py "
        "uses: adapt LimitedHttpToolsProtocol before widening the uvicorn pin"
    )


def test_every_overridden_callback_exists_on_the_base() -> None:
    overridden = {n.name for n in SUBCLASS.body if isinstance(n, ast.FunctionDef)}
    super_calls = {
        n.func.attr
        for n in ast.walk(SUBCLASS)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Call)
        and isinstance(n.func.value.func, ast.Name)
        and n.func.value.func.id == "super"
    }
    missing = sorted(name for name in super_calls if not hasattr(HttpToolsProtocol, name))
    assert not missing, f"HttpToolsProtocol lost {missing}, called through super() by our protocol"
    # Callbacks we override that the base does not define would silently never be called.
    callbacks = {n for n in overridden if n.startswith("on_") or n.startswith("connection_")}
    never_called = sorted(n for n in callbacks if not hasattr(HttpToolsProtocol, n))
    assert not never_called, f"uvicorn no longer calls {never_called}: our override is dead code"


def test_every_cycle_field_the_subclass_touches_still_exists() -> None:
    used = {
        n.attr
        for n in ast.walk(SUBCLASS)
        if isinstance(n, ast.Attribute)
        and (
            (isinstance(n.value, ast.Name) and n.value.id == "cycle")
            or (isinstance(n.value, ast.Attribute) and n.value.attr == "cycle")
        )
    }
    assert used, "the subclass no longer touches the cycle: drop this test"
    missing = sorted(used - _assigned_on_self(RequestResponseCycle))
    assert not missing, f"uvicorn's RequestResponseCycle no longer has {missing}"


def test_status_lines_are_still_bytes_per_status_code() -> None:
    assert httptools_impl.STATUS_LINE[503].startswith(b"HTTP/1.1 503")
    assert ours.error_response(503, "x").startswith(b"HTTP/1.1 503")


def test_the_graceful_server_uses_only_what_uvicorn_server_still_has() -> None:
    """service/server.py: uvicorn.Server's attributes and the protocol's constructor, as
    uvicorn's own startup builds it (a backlog connection gets the same protocol)."""
    import uvicorn

    import service.server as graceful

    tree = ast.parse(Path(graceful.__file__).read_text())
    cls = next(
        n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "GracefulServer"
    )
    missing = sorted(_self_attributes(cls) - _assigned_on_self(uvicorn.Server))
    assert not missing, f"uvicorn.Server no longer has {missing}, used by service/server.py"
    params = inspect.signature(HttpToolsProtocol.__init__).parameters
    assert {"config", "server_state", "app_state"} <= set(params)
    assert inspect.iscoroutinefunction(uvicorn.Server.shutdown)
