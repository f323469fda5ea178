"""The hand-written stub of the native module (``maru/_maru.pyi``) against the module itself:
every name, class, method and property on one side is on the other."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import maru
from maru import _maru

STUB = Path(maru.__file__).with_name("_maru.pyi")


def stub_names() -> tuple[set[str], dict[str, set[str]]]:
    """Top-level names of the stub, and the members of each of its classes."""
    tree = ast.parse(STUB.read_text())
    names: set[str] = set()
    classes: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
            members = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
            classes[node.name] = members
        elif isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names, classes


def runtime_members(cls: type) -> set[str]:
    return {n for n in vars(cls) if not n.startswith("__") or n in {"__init__", "__enter__", "__exit__", "__len__"}}


# Names the stub declares for typing only (not attributes of the module).
TYPING_ONLY = {"Key", "_Buffer"}


def test_every_native_name_is_in_the_stub_and_back() -> None:
    names, _ = stub_names()
    runtime = {n for n in dir(_maru) if not n.startswith("__") or n == "__version__"}
    assert names - TYPING_ONLY == runtime, (
        f"only in the stub: {sorted(names - TYPING_ONLY - runtime)}; "
        f"only in the module: {sorted(runtime - names)}"
    )


def test_every_class_member_matches() -> None:
    _, classes = stub_names()
    for name, members in classes.items():
        if name in TYPING_ONLY:
            continue
        cls = getattr(_maru, name)
        assert inspect.isclass(cls), name
        runtime = runtime_members(cls)
        # Native classes get __init__ from `#[new]` (as __new__); a stub states it as __init__.
        runtime.discard("__new__")
        stubbed = members - {"__init__"}
        runtime.discard("__init__")
        assert stubbed == runtime, (
            f"{name}: only in the stub: {sorted(stubbed - runtime)}; only in the module: {sorted(runtime - stubbed)}"
        )


def test_the_error_classes_are_plain_python() -> None:
    # `maru.errors` is a typed Python module (no stub needed); the native module has none.
    assert not hasattr(_maru, "MaruError")
    assert maru.MaruError.__module__ == "maru.errors"
