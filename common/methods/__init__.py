"""Federated methods: a name → method registry.

A method lives in ``common/methods/<name>.py`` and registers itself with ``@register("<name>")``;
``get_method(name)`` imports that module on first use, so adding a method touches only its own
module, its config keys and its tests.
"""

from __future__ import annotations

import importlib

from common.config import ConfigError
from common.methods.base import LocalJob, LocalResult, Method

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make ``cls`` available as ``get_method(name)``."""

    def decorate(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method '{name}' is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_method(name: str) -> Method:
    """An instance of the method registered as ``name`` (config key 'method')."""
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"common.methods.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"common.methods.{name}":
                raise
    if name not in _REGISTRY:
        raise ConfigError(f"config key 'method' = {name!r}: no such method (known: {sorted(_REGISTRY)})")
    return _REGISTRY[name]()


__all__ = ["LocalJob", "LocalResult", "Method", "get_method", "register"]
