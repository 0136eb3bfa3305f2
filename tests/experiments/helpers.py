"""Importing an ``experiments/*.py`` script as a module, for its tests."""

import importlib.util
import pathlib
from types import ModuleType

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "experiments"


def load_experiment(name: str) -> ModuleType:
    """``experiments/<name>.py`` as a fresh module."""
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
