"""The one exception tree: every exception class of the package is defined in meshllm/errors.py,
documented, under MeshError, and the ones a caller acts on are importable from ``meshllm``."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import meshllm
from meshllm import errors

PACKAGE = Path(meshllm.__file__).parent


def _bases(node: ast.ClassDef) -> set[str]:
    return {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases if isinstance(b, (ast.Name, ast.Attribute))}


def test_every_public_exception_class_is_defined_in_errors_py() -> None:
    tree = {name for name, obj in vars(errors).items() if inspect.isclass(obj) and issubclass(obj, BaseException)}
    strays = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue  # private control-flow signals stay next to their one user
            if _bases(node) & (tree | {"Exception", "BaseException", "ValueError", "RuntimeError"}):
                strays.append(f"{path.relative_to(PACKAGE.parent)}: {node.name}")
    assert not strays, f"exception classes outside meshllm/errors.py: {strays}"


def test_the_tree_is_rooted_documented_and_listed() -> None:
    classes = [obj for obj in vars(errors).values() if inspect.isclass(obj) and issubclass(obj, BaseException)]
    assert {c.__name__ for c in classes} - {"MeshError"} == set(errors.__all__) - {"MeshError"}
    for c in classes:
        assert issubclass(c, errors.MeshError), c
        assert c.__doc__ and c.__doc__.strip(), f"{c.__name__} has no docstring"
        if c is not errors.MeshError:
            assert c.__name__ in (errors.__doc__ or ""), f"{c.__name__} is missing from the tree in the docstring"


def test_request_refusals_and_client_failures_are_one_type() -> None:
    from meshllm.serve import api, client
    with_code = errors.RequestFailed(api.BUSY, "the mesh is busy", "r1", "my/replies/r1")
    assert isinstance(with_code, meshllm.RequestFailed) and client.RequestFailed is errors.RequestFailed
    assert not hasattr(api, "RequestError")
    assert with_code.reply() == {"id": "r1", "error": {"code": "busy", "message": "the mesh is busy"}}
    assert isinstance(meshllm.RequestTimeout("late"), meshllm.RequestFailed)


def test_callers_can_import_what_they_act_on_from_meshllm() -> None:
    for name in ("MeshError", "RequestFailed", "RequestTimeout", "ReplyError", "BrokerError", "ModelError",
                 "GenerationError", "PlanError", "SecretError"):
        assert name in meshllm.__all__ and getattr(meshllm, name) is getattr(errors, name)
