"""`CheckpointManager`: numbered checkpoints for training runs, on Orbax's ``CheckpointManager``.

Each step is a directory ``<directory>/<step>`` with the same two items as
:func:`jaxquant.checkpoint.save` (``arrays`` and the ``jaxquant`` JSON description), so a
single step can also be read with :func:`jaxquant.checkpoint.restore`. Orbax keeps the last
``max_to_keep`` steps, writes in the background (``save`` returns once the arrays are copied to
host memory), and finalizes each step with an atomic rename: a step whose save was
interrupted is never listed, and the steps before it stay intact.

Example:
  >>> mngr = CheckpointManager("/tmp/run", max_to_keep=3)
  >>> mngr.save(step, {"params": params, "opt_state": opt_state, "step": step})
  >>> state = mngr.restore(target=jax.eval_shape(lambda: state))   # latest step
  >>> mngr.close()
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import orbax.checkpoint as ocp

from jaxquant.checkpoint.common import restore_with, save_args
from jaxquant.checkpoint.tree_codec import ARRAYS_ITEM, META_ITEM, encode

__all__ = ["CheckpointManager"]

PyTree = Any


class CheckpointManager:
    """Saves and restores numbered steps of a pytree (params, optimizer state, step...).

    Args:
      directory: the run's root directory (created if missing).
      max_to_keep: keep only the newest this many steps (``None`` keeps all).
      save_interval_steps: :meth:`save` writes only on steps divisible by this.
      async_save: write in a background thread; call :meth:`wait_until_finished` (or
        :meth:`close`) before reading the files from elsewhere.

    Example:
      >>> with CheckpointManager("/tmp/run", max_to_keep=2) as mngr:
      ...     mngr.save(10, {"w": jnp.ones(3)})
      ...     mngr.wait_until_finished()
      ...     mngr.restore()["w"]
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
        self.directory = pathlib.Path(os.fspath(directory)).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # remove the leftovers of interrupted saves
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                ARRAYS_ITEM: ocp.StandardCheckpointHandler(),
                META_ITEM: ocp.JsonCheckpointHandler(),
            },
        )

    def save(self, step: int, tree: PyTree, *, force: bool = False) -> bool:
        """Saves ``tree`` as ``step`` (in the background when ``async_save``).

        Args:
          step: the training step, a non-negative int.
          tree: arrays, ``QArray`` leaves, optax states, Python scalars...
          force: save even if ``save_interval_steps`` says not to.

        Returns:
          Whether a save was started: False (as in Orbax) for a step off
          ``save_interval_steps`` or not newer than the latest saved step.

        Raises:
          ValueError: an unsupported leaf (checked before anything is written), or
            ``force=True`` on a step that is already saved.
        """
        step = int(step)
        arrays, meta = encode(tree)
        try:
            return self._manager.save(step, args=save_args(arrays, meta), force=force)
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:
            raise ValueError(
                f"step {step} is already saved in {self.directory}; saved steps are never "
                "overwritten. Use a new step number (or delete that step directory first)."
            ) from e

    def restore(self, step: int | None = None, target: PyTree | None = None) -> PyTree:
        """Restores ``step`` (default: the latest finished one).

        Args:
          step: the step to read, or None for :meth:`latest_step`.
          target: as in :func:`jaxquant.checkpoint.restore`; required when the tree holds
            custom pytree nodes such as optax states (e.g. ``jax.eval_shape`` of the state).

        Raises:
          FileNotFoundError: no finished step (or not this one) in the directory.
          ValueError: ``target`` mismatch (names the first differing path), or a corrupted step.
        """
        self.wait_until_finished()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(
                    f"No finished checkpoint in {self.directory}. Save one first (interrupted "
                    "saves are not listed)."
                )
            step = steps[-1]
        step = int(step)
        if step not in steps:
            raise FileNotFoundError(
                f"No finished checkpoint for step {step} in {self.directory}; the steps are "
                f"{steps}."
            )

        def read_meta():
            args = ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
            return self._manager.restore(step, args=args)[META_ITEM]

        def read_arrays(abstract: dict) -> dict:
            args = ocp.args.Composite(**{ARRAYS_ITEM: ocp.args.StandardRestore(abstract)})
            return self._manager.restore(step, args=args)[ARRAYS_ITEM]

        return restore_with(read_meta, read_arrays, target, f"{self.directory} step {step}")

    def latest_step(self) -> int | None:
        """The newest saved step, or None (see :meth:`all_steps`)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The saved steps, oldest first.

        As in Orbax, a step counts from the moment its background save starts; steps left
        unfinished by a crashed process are never listed. :meth:`restore` waits for pending
        saves before reading.
        """
        return sorted(self._manager.all_steps())

    def wait_until_finished(self) -> None:
        """Blocks until background saves are written and finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.directory)!r}, steps={self.all_steps()})"
