"""Imports run only downward through the layers of ``jaxquant``.

The layer order (ARCHITECTURE.md)::

    errors <- core <- checkpoint <- nn <- ptq | train <- data <- models <- eval <- cli

A module may import its own package and any package of a lower layer; ``ptq`` and ``train``
share a layer and may not import each other. ``core`` (and ``errors``) import no Flax, Optax or
Orbax, so ``import jaxquant as jq`` stands alone; ``checkpoint`` needs only ``core`` and Orbax.
The package root ``jaxquant/__init__.py`` imports only the bottom layers at module level (what
it offers from higher layers it imports lazily, inside a function). Every import counts,
function-local ones included: an upward import hidden in a function is still a cycle waiting
for its caller. No module imports ``jax._src`` (it breaks on every JAX release).

The check reads the source with :mod:`ast` (nothing is imported), so it also sees imports on
paths the tests never run.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "jaxquant"

# Bottom to top; packages in one tuple share a layer and may not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("core",),
    ("checkpoint",),
    ("nn",),
    ("ptq", "train"),
    ("data",),
    ("models",),
    ("eval",),
    ("cli",),
)
RANK = {pkg: rank for rank, layer in enumerate(LAYERS) for pkg in layer}
# Third-party packages a layer may not import (top-level module names).
BANNED_THIRD_PARTY = {
    "errors": {"flax", "optax", "orbax"},
    "core": {"flax", "optax", "orbax"},
    "checkpoint": {"flax", "optax"},
}
# What the package root may import at module level (`import jaxquant` must not pull in Flax).
ROOT_EAGER = {"errors", "core"}


@dataclasses.dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "jaxquant.ptq.gptq"
    target: str  # the imported module, e.g. "jaxquant.nn.linear" or "flax.linen"
    line: int
    local: bool  # inside a function (a lazy import)

    def where(self, root: Path) -> str:
        rel = self.module.replace(".", "/")
        path = root.parent / f"{rel}.py"
        if not path.exists():
            path = root.parent / rel / "__init__.py"
        return f"{path.relative_to(root.parent)}:{self.line}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _exists(dotted: str, root: Path) -> bool:
    rel = Path(*dotted.split("."))
    return (root.parent / rel).with_suffix(".py").exists() or (
        root.parent / rel / "__init__.py"
    ).exists()


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import in ``path`` (module level and function local), as absolute module names.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else
    ``pkg``; ``importlib.import_module("...")`` with a constant string counts too.
    """
    module = module_name(path, root)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_local = local or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, alias.name, child.lineno, local))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = _resolve_relative(module, _is_package(path), child.level, child.module)
                else:
                    base = child.module or ""
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    target = sub if _exists(sub, root) else base
                    found.append(Import(module, target, child.lineno, local))
            elif (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr == "import_module"
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
            ):
                found.append(Import(module, child.args[0].value, child.lineno, local))
            visit(child, child_local)

    visit(tree, False)
    return found


def package_of(dotted: str, root: Path) -> str | None:
    """``jaxquant.nn.linear`` -> ``nn``; ``jaxquant.cli`` -> ``cli``; ``jaxquant`` -> ``""``
    (the package root); a module outside ``jaxquant`` -> None."""
    parts = dotted.split(".")
    if parts[0] != root.name:
        return None
    return parts[1] if len(parts) > 1 else ""


def violations(root: Path) -> list[str]:
    """One line per import that breaks the layering of the package at ``root``."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        src = package_of(module, root)
        if src and src not in RANK:
            problems.append(
                f"{path.relative_to(root.parent)}: package {src!r} has no layer: add it to "
                "LAYERS in tests/test_layering.py and to ARCHITECTURE.md"
            )
            continue
        for imp in imports_of(path, root):
            where = imp.where(root)
            top = imp.target.split(".")[0]
            if imp.target == "jax._src" or imp.target.startswith("jax._src."):
                problems.append(f"{where}: {module} imports {imp.target} (JAX internals)")
                continue
            dst = package_of(imp.target, root)
            if dst is None:
                if top in BANNED_THIRD_PARTY.get(src, ()):
                    problems.append(f"{where}: {module} ({src}) imports {imp.target}")
                continue
            if src == "":  # the package root
                if not imp.local and dst not in ROOT_EAGER and dst != "":
                    problems.append(
                        f"{where}: jaxquant/__init__.py imports {imp.target} at module level; "
                        "import it lazily (inside __getattr__) so `import jaxquant` stays light"
                    )
                continue
            if dst == "" or dst == src:
                # `from jaxquant import X` reaches the root's core re-exports (checked above).
                continue
            if dst not in RANK:
                continue  # reported once, for the module itself
            if RANK[dst] > RANK[src]:
                problems.append(
                    f"{where}: {module} ({src}, layer {RANK[src]}) imports {imp.target} "
                    f"({dst}, layer {RANK[dst]}): upward"
                )
            elif RANK[dst] == RANK[src]:
                problems.append(
                    f"{where}: {module} ({src}) imports {imp.target} ({dst}): same layer"
                )
    return problems


def test_imports_run_only_downward():
    problems = violations(ROOT)
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_every_package_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    modules = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    assert packages | modules <= set(RANK), sorted((packages | modules) - set(RANK))


# --- the checker itself can fail ---------------------------------------------------------------


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "jaxquant"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pkg in ("", "core", "checkpoint", "nn", "ptq", "train"):
        (root / pkg).mkdir(parents=True, exist_ok=True)
        (root / pkg / "__init__.py").touch()
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"core/a.py": "from jaxquant.nn import b\n", "nn/b.py": ""}, "upward"),
        ({"core/a.py": "def f():\n    import jaxquant.ptq.c\n", "ptq/c.py": ""}, "upward"),
        ({"nn/a.py": "from ..ptq import c\n", "ptq/c.py": ""}, "upward"),
        ({"ptq/a.py": "from jaxquant.train import t\n", "train/t.py": ""}, "same layer"),
        ({"core/a.py": "import flax.linen as nn\n"}, "imports flax.linen"),
        ({"checkpoint/a.py": "def f():\n    import optax\n"}, "imports optax"),
        ({"nn/a.py": "from jax._src import core\n"}, "JAX internals"),
        (
            {
                "nn/a.py": "import importlib\nm = importlib.import_module('jaxquant.train.t')\n",
                "train/t.py": "",
            },
            "upward",
        ),
        ({"__init__.py": "from jaxquant.nn import b\n", "nn/b.py": ""}, "lazily"),
        ({"shiny/__init__.py": ""}, "has no layer"),
    ],
)
def test_checker_flags_a_planted_import(tmp_path, files, expected):
    problems = violations(_plant(tmp_path, files))
    assert len(problems) == 1 and expected in problems[0], problems


def test_checker_accepts_downward_and_lazy_root_imports(tmp_path):
    root = _plant(
        tmp_path,
        {
            "__init__.py": "from jaxquant.core import q\n\ndef __getattr__(n):\n"
            "    from jaxquant import nn\n    return nn\n",
            "core/q.py": "import jax\n",
            "nn/a.py": "from jaxquant.core import q\nfrom . import b\nimport flax\n",
            "nn/b.py": "",
            "ptq/a.py": "from ..nn import a\nfrom jaxquant import QArray\n",
            "train/a.py": "import optax\nfrom jaxquant.checkpoint import x\n",
            "checkpoint/x.py": "import orbax.checkpoint as ocp\n",
        },
    )
    assert violations(root) == []
