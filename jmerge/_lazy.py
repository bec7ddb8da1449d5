"""Lazy package attributes (PEP 562), so that ``import jmerge`` costs only what is used.

``jmerge merge`` (the file-merge CLI) needs the safetensors reader and the elementwise
kernels, not chex, the curvature code, the solvers or orbax; importing them eagerly cost about
0.6 s of a 1.2 s start-up (``python -X importtime -c "import jmerge.cli"``). Each package
``__init__`` names where its public attributes live and imports a submodule on first access;
``from jmerge import mats``, ``jmerge.mats``, ``dir(jmerge)`` and ``from jmerge import *``
behave as with eager imports.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping


def attach(
    package: str, where: Mapping[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: attribute ``name`` is ``where[name]``'s
    attribute of the same name (``where[name]`` a submodule path relative to ``package``, or
    ``""`` for a submodule called ``name`` itself). The value is cached in the package's
    namespace on first access, so later lookups do not come back here.

    The package's module class becomes :class:`_Package`, so a submodule that shares its name
    with the function it defines (``merges/mats.py`` and ``mats``) never hides the function.

    Raises:
      AttributeError: ``name`` is not one of ``where``'s keys (the usual message).
    """

    sys.modules[package].__class__ = _Package

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        sub = where[name]
        if sub:
            value = getattr(importlib.import_module(f"{package}.{sub}"), name)
        else:
            value = importlib.import_module(f"{package}.{name}")
        module = importlib.import_module(package)
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(where))

    return __getattr__, __dir__


class _Package(types.ModuleType):
    """A package module whose attribute ``name`` stays the object ``_WHERE`` names when the
    import system binds the submodule of the same name on it (see the module docstring)."""

    def __setattr__(self, name: str, value: object) -> None:
        where = self.__dict__.get("_WHERE", {})
        if (
            isinstance(value, types.ModuleType)
            and where.get(name) == name
            and value.__name__ == f"{self.__name__}.{name}"
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)
