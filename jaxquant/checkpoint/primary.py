"""Files that one process writes for all: process 0 writes, every process waits for it.

In a multi-process run (``jax.distributed``) every process runs the same program, but a
result file, a JSON sidecar or a directory rename must happen once. Orbax array saves are
different: every process calls them (each writes its own shards and Orbax coordinates them).
On one process these helpers just run the function.

Example::

    token = agreed_token()                                  # the same on every process
    staging = out.with_name(f"{out.name}.new-{token}")
    jaxquant.checkpoint.save(staging / "params", params)    # every process
    on_primary(lambda: write_sidecar_and_rename(staging, out), f"finishing {out}")
    # from here on every process sees the finished `out`
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxquant.errors import JaxquantError

__all__ = ["agreed_token", "barrier", "is_primary", "on_primary"]


def is_primary() -> bool:
    """Whether this process writes the run's shared files (process 0)."""
    return jax.process_index() == 0


def _broadcast(values: np.ndarray) -> np.ndarray:
    """Process 0's ``values`` on every process (a collective: every process must call it)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(values))


def on_primary(fn: Callable[[], Any], what: str) -> Any:
    """Runs ``fn()`` on process 0 only; every process returns after it finished.

    A collective (every process must call it, in the same order): process 0 tells the others
    whether ``fn`` succeeded, so none of them goes on to read a half-written file, and none
    waits forever for a process 0 that failed.

    Args:
      fn: the writes (no arguments).
      what: what ``fn`` does, for the error on the other processes.

    Returns:
      ``fn()``'s value on process 0, None on the others.

    Raises:
      The exception of ``fn`` on process 0; JaxquantError on the others when it failed.
    """
    if jax.process_count() == 1:
        return fn()
    error, value = None, None
    if is_primary():
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001  (re-raised below, after telling the others)
            error = e
    failed = bool(_broadcast(np.int32(error is not None)))
    if error is not None:
        raise error
    if failed:
        raise JaxquantError(f"{what} failed on process 0; its output says why.")
    return value


def agreed_token() -> str:
    """A random hex token that is the same on every process (process 0's), e.g. to name a
    staging directory that all processes write into. 16 hex digits."""
    words = np.frombuffer(uuid.uuid4().bytes[:8], np.uint32).copy()
    if jax.process_count() > 1:
        words = _broadcast(words).astype(np.uint32)
    return "".join(f"{int(w):08x}" for w in words)


def barrier(name: str) -> None:
    """Waits until every process reached ``barrier(name)`` (nothing on one process); e.g.
    after all have checked an output directory and before any writes into it."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
