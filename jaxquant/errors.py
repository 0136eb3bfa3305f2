"""The errors jaxquant raises for bad input: one family, each message naming the file and the fix.

Every class derives from :class:`ValueError` (so ``except ValueError`` keeps working) through
:class:`JaxquantError`. The command line prints any of them as one line and exits with status 2.
This module imports nothing from jaxquant, so every layer (``core`` included) may raise them.

Example:
  >>> try:
  ...     jaxquant.checkpoint.restore("/tmp/broken")
  ... except jaxquant.errors.CorruptCheckpointError as e:
  ...     print(e)            # names the checkpoint, the array and what to do
"""

from __future__ import annotations

__all__ = [
    "CorruptCheckpointError",
    "CorruptModelFileError",
    "DownloadError",
    "JaxquantError",
    "NonFiniteError",
]


class JaxquantError(ValueError):
    """Bad input a user can fix: a corrupt file, a wrong flag, a mismatched model."""


class CorruptCheckpointError(JaxquantError):
    """A checkpoint's data or metadata is damaged (a failed checksum, a truncated file)."""


class CorruptModelFileError(JaxquantError):
    """A model file (GGUF, safetensors, ``config.json``) is damaged, truncated or incomplete."""


class DownloadError(JaxquantError, RuntimeError):
    """Fetching a model failed (also a :class:`RuntimeError`, as before this module existed)."""


class NonFiniteError(JaxquantError):
    """A loss or perplexity came out NaN or infinite: the model or its weights are broken."""
