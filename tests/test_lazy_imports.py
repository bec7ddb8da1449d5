"""Lazy package attributes (jmerge._lazy): the file-merge CLI imports neither chex, orbax nor
the curvature/solver code, and every public name resolves to what the eager imports gave."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return out.stdout.strip()


def test_cli_import_skips_heavy_modules():
    code = (
        "import sys, jmerge.cli, jmerge.io.streaming; "
        "print(sorted(m for m in ('chex', 'orbax.checkpoint', 'jmerge.curvature', "
        "'jmerge.solvers', 'jmerge.merges.mats') if m in sys.modules))"
    )
    assert _run(code) == "[]"


@pytest.mark.parametrize("name", ["mats", "gradient_matching"])
def test_function_named_like_its_module_stays_a_function(name):
    # Importing jmerge/merges/<name>.py binds the module on the package; the package keeps
    # the function, as the eager `from .mats import mats` did.
    code = (
        f"import importlib, types, jmerge, jmerge.merges; "
        f"importlib.import_module('jmerge.merges.{name}'); "
        f"from jmerge.merges import {name} as f; "
        f"print(callable(f), isinstance(f, types.ModuleType), "
        f"jmerge.{name} is f, jmerge.merges.{name} is f)"
    )
    assert _run(code) == "True False True True"


def test_every_public_name_resolves():
    import jmerge
    import jmerge.io
    import jmerge.merges

    for pkg in (jmerge, jmerge.merges, jmerge.io):
        for name in pkg.__all__:
            value = getattr(pkg, name)
            assert value is not None, (pkg.__name__, name)
            if name in ("curvature", "io", "merges", "sharding", "solvers", "tree"):
                assert isinstance(value, types.ModuleType)
            else:
                assert not isinstance(value, types.ModuleType), (pkg.__name__, name)
        assert set(pkg.__all__) <= set(dir(pkg))
    assert jmerge.mats is jmerge.merges.mats
    assert jmerge.io.save_orbax.__module__ == "jmerge.io.orbax"
    with pytest.raises(AttributeError, match="has no attribute 'not_a_merge'"):
        jmerge.not_a_merge  # noqa: B018


def test_star_import():
    ns: dict = {}
    exec("from jmerge import *", ns)
    import jmerge

    assert {n for n in jmerge.__all__} <= set(ns)
    assert ns["ties"] is jmerge.merges.ties
