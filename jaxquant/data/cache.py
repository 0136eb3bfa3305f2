"""The cache folder shared by data sets (tokenized text) and fetched models."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "JAXQUANT_CACHE"


def cache_dir() -> Path:
    """The cache folder: `$JAXQUANT_CACHE`, else `~/.cache/jaxquant`.

    Returns:
        The folder, created if missing.
    """
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxquant"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
