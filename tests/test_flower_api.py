"""The Flower app (``common/``, ``server/``, ``client/``: what ships in the FAB) uses Flower's public API only.

Public: the names in ``__all__`` of ``PUBLIC_MODULES``.  A violation is an import of any other flwr
module (e.g. ``flwr.common.constant``, ``flwr.supercore.run``, a ``_``-prefixed part), of a name outside
its module's ``__all__``, or the use of an ``_``-prefixed attribute that an imported Flower class defines
(e.g. ``FedAvg._construct_messages`` through ``self`` in a subclass).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP_FOLDERS = ("common", "server", "client")
PUBLIC_MODULES = ("flwr.app", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.clientapp", "flwr.clientapp.mod")


def _is_flwr(module: str) -> bool:
    return module == "flwr" or module.startswith("flwr.")


def private_flower_uses(source: str) -> list[str]:
    """Every use of a non-public Flower name in ``source`` (Python code), as readable strings."""
    tree = ast.parse(source)
    problems, classes = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if _is_flwr(a.name) and a.name not in PUBLIC_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and _is_flwr(node.module):
            if node.module not in PUBLIC_MODULES:
                problems.append(f"from {node.module} import {', '.join(a.name for a in node.names)}")
                continue
            exported = importlib.import_module(node.module).__all__
            for alias in node.names:
                if alias.name not in exported:
                    problems.append(f"from {node.module} import {alias.name} (not in its __all__)")
                else:
                    obj = getattr(importlib.import_module(node.module), alias.name)
                    classes += [obj] if inspect.isclass(obj) else []
    private = {name for cls in classes for name in dir(cls) if name.startswith("_") and not name.startswith("__")}
    problems += [f"attribute {node.attr} (private in Flower)" for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and node.attr in private]
    return problems


def test_the_checker_catches_private_imports_and_attributes():
    source = ("from flwr.common.constant import ErrorCode\nimport flwr.supercore.run\n"
              "from flwr.serverapp import Grid\nfrom flwr.app import Message, make_message\n"
              "from flwr.serverapp.strategy import FedAvg\n"
              "class S(FedAvg):\n    def f(self):\n        return self._construct_messages(1, [], 'train')\n")
    assert private_flower_uses(source) == [
        "from flwr.common.constant import ErrorCode", "import flwr.supercore.run",
        "from flwr.app import make_message (not in its __all__)", "attribute _construct_messages (private in Flower)"]
    assert private_flower_uses("from flwr.app import Message\nfrom flwr.serverapp.strategy import Strategy\n") == []


@pytest.mark.parametrize("folder", APP_FOLDERS)
def test_the_app_uses_public_flower_names_only(folder):
    found = {str(path.relative_to(ROOT)): problems for path in sorted((ROOT / folder).rglob("*.py"))
             if (problems := private_flower_uses(path.read_text()))}
    assert found == {}, f"private Flower API used (build on flwr.app / flwr.serverapp / flwr.clientapp): {found}"
