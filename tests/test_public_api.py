"""Every public name of jaxquant imports: ``__all__`` if defined, else the re-exports in
``jaxquant/__init__.py`` (``from ... import X as X``). Names added later are picked up."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

import jaxquant


def _reexported_names(module) -> list[str]:
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    names = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            names += [a.asname for a in node.names if a.asname is not None and a.asname == a.name]
        elif isinstance(node, ast.Import):
            names += [a.asname for a in node.names if a.asname is not None]
    return names


def _public_names(module) -> list[str]:
    names = list(getattr(module, "__all__", ())) or _reexported_names(module)
    return sorted(set(names))


PUBLIC = _public_names(jaxquant)

# The core contract of /work/shared/API.md; other names may come and go freely.
CORE_CONTRACT = ["QuantSpec", "QArray", "quantize", "dequantize", "fake_quant"]


def test_public_surface_is_not_empty():
    assert set(CORE_CONTRACT) <= set(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_imports(name):
    obj = getattr(jaxquant, name)
    assert obj is not None
    # `from jaxquant import name` works too.
    assert getattr(importlib.import_module("jaxquant"), name) is obj


@pytest.mark.parametrize("name", sorted(set(getattr(jaxquant.core, "__all__", ()))))
def test_core_all_names_import(name):
    core = importlib.import_module("jaxquant.core")
    assert getattr(core, name) is not None


def test_version():
    assert isinstance(jaxquant.__version__, str) and jaxquant.__version__


@pytest.mark.parametrize("package", ["jaxquant.nn", "jaxquant.ptq", "jaxquant.train"])
def test_subpackage_reexports_import(package):
    module = importlib.import_module(package)
    names = _public_names(module)
    assert names, package
    for name in names:
        assert getattr(module, name) is not None, (package, name)
