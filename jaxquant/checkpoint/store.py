"""Orbax checkpoints of pytrees that hold :class:`~jaxquant.core.QArray` leaves.

A checkpoint is a plain Orbax ``CompositeCheckpointHandler`` directory with two items: the
``arrays`` (a ``QArray`` stored as its children) and the ``jaxquant`` JSON description of the
tree; :mod:`jaxquant.checkpoint.tree_codec` defines that format. So ``restore(directory)`` rebuilds the
same tree without a target, and nothing is ever unpickled. Orbax writes into a temporary sibling
and renames it when complete, so an interrupted save never leaves a directory that looks finished.

Example:
  >>> from jaxquant.core import QuantSpec, quantize
  >>> tree = {"w": quantize(jnp.ones((256, 64)), QuantSpec(qtype="int4", group_size=128)),
  ...         "b": jnp.zeros(64)}
  >>> path = save("/tmp/ckpt", tree)
  >>> restored = restore("/tmp/ckpt")                 # same structure, bit-identical
  >>> restored = restore("/tmp/ckpt", jax.eval_shape(lambda: tree))   # or into shardings

For training runs (keep the last ``k``, asynchronous saves, resume) see
:class:`~jaxquant.checkpoint.CheckpointManager`.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any

import orbax.checkpoint as ocp

from jaxquant.checkpoint.common import (
    TMP_SUFFIX,
    checkpointer,
    read_checked_meta,
    restore_with,
    save_args,
)
from jaxquant.checkpoint.primary import agreed_token, is_primary, on_primary
from jaxquant.checkpoint.tree_codec import ARRAYS_ITEM, META_ITEM, encode

__all__ = ["metadata", "restore", "save"]

PyTree = Any


def _write(path: pathlib.Path, arrays: dict, meta: dict) -> None:
    ckptr = checkpointer()
    try:
        ckptr.save(path, save_args(arrays, meta))
    finally:
        ckptr.close()


def _is_checkpoint(path: pathlib.Path) -> bool:
    return (path / META_ITEM).is_dir() or (path / "_CHECKPOINT_METADATA").is_file()


def save(directory: str | os.PathLike, tree: PyTree, *, force: bool = False) -> pathlib.Path:
    """Saves ``tree`` (arrays, ``QArray`` leaves, dicts/lists/tuples, scalars) as an Orbax checkpoint.

    The write is atomic: Orbax writes into ``<directory>.orbax-checkpoint-tmp`` and renames
    it when complete. With ``force=True`` an existing checkpoint is replaced only after the new
    one is complete (it is written to a sibling, then swapped in).

    Args:
      directory: where to write; must not exist unless ``force``.
      tree: the pytree to save. Custom pytree nodes (e.g. optax states) are saved too, but
        restoring them needs ``target=``.
      force: replace an existing checkpoint at ``directory``.

    Returns:
      The absolute path written.

    Raises:
      FileExistsError: ``directory`` exists and ``force`` is False.
      ValueError: an unsupported leaf, or ``force`` on a directory that is not a checkpoint.

    Example:
      >>> save("/tmp/ckpt", {"w": jnp.ones((4, 4))}, force=True)
    """
    directory = pathlib.Path(os.fspath(directory)).absolute()
    if TMP_SUFFIX in directory.name:
        raise ValueError(f"{directory}: names containing {TMP_SUFFIX!r} are reserved by Orbax.")
    arrays, meta = encode(tree)  # validate everything before touching the disk
    if not directory.exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        _write(directory, arrays, meta)
        return directory
    if not force:
        raise FileExistsError(
            f"{directory} already exists. Pass force=True to replace it (the old checkpoint is "
            "kept until the new one is complete), or choose another directory."
        )
    if not directory.is_dir() or (any(directory.iterdir()) and not _is_checkpoint(directory)):
        raise ValueError(
            f"{directory} exists and is not a checkpoint; refusing to replace it with "
            "force=True. Delete it yourself or choose another directory."
        )
    # Several processes: all write their shards into one staging folder (one agreed name),
    # process 0 alone removes leftovers and swaps, and none returns before the swap is done.
    on_primary(lambda: _remove_leftovers(directory), f"cleaning up next to {directory}")
    tag = agreed_token()[:8]
    staging = directory.with_name(f"{directory.name}.jaxquant-new-{tag}")
    old = directory.with_name(f"{directory.name}.jaxquant-old-{tag}")
    try:
        _write(staging, arrays, meta)
    except BaseException:
        if is_primary():
            shutil.rmtree(staging, ignore_errors=True)
        raise

    def swap():
        # Until the first rename the old checkpoint is untouched; between the two renames
        # (microseconds) it sits at `old` and the complete new one at `staging`: restore then
        # finishes the swap (_recover).
        os.rename(directory, old)
        os.rename(staging, directory)
        shutil.rmtree(old, ignore_errors=True)

    on_primary(swap, f"replacing {directory}")
    return directory


def _remove_leftovers(directory: pathlib.Path) -> None:
    """Deletes what interrupted ``force`` saves left next to an intact ``directory``."""
    for p in directory.parent.glob(f"{directory.name}.jaxquant-*"):
        if ".jaxquant-new-" in p.name or ".jaxquant-old-" in p.name:
            shutil.rmtree(p, ignore_errors=True)


def _missing_message(directory: pathlib.Path) -> str:
    msg = f"No checkpoint at {directory}."
    parent = directory.parent
    if parent.is_dir():
        sibs = sorted(p.name for p in parent.iterdir() if p.name.startswith(directory.name + "."))
        tmp = [s for s in sibs if TMP_SUFFIX in s or ".jaxquant-new-" in s]
        old = [s for s in sibs if ".jaxquant-old-" in s]
        if tmp:
            msg += (
                f" Found an unfinished save ({tmp[0]}): it was interrupted before Orbax finalized "
                "it and holds no usable checkpoint. Delete it and save again."
            )
        if old:
            msg += (
                f" Found {old[0]}: a checkpoint moved aside while being replaced; rename it to "
                f"{directory.name} to use it."
            )
    return msg + " Check the path (or list the parent directory)."


def _recover(directory: pathlib.Path) -> None:
    """Finishes a ``force`` save that crashed between its two renames.

    Then ``directory`` is missing, the old checkpoint sits at ``<name>.jaxquant-old-<tag>`` and
    the new one, complete (Orbax had finalized it), at ``<name>.jaxquant-new-<tag>``: the new
    one is moved into place and the old one deleted, as the save would have done.
    """
    if directory.exists() or not directory.parent.is_dir():
        return
    for old in directory.parent.glob(f"{directory.name}.jaxquant-old-*"):
        new = old.with_name(old.name.replace(".jaxquant-old-", ".jaxquant-new-"))
        if new.is_dir() and _is_checkpoint(new) and (new / META_ITEM).is_dir():
            try:
                os.rename(new, directory)
            except OSError:
                if not directory.is_dir():
                    raise
                return  # another process of a multi-process run finished it first
            shutil.rmtree(old, ignore_errors=True)
            return


def _check_directory(directory: pathlib.Path) -> None:
    _recover(directory)
    if TMP_SUFFIX in directory.name:
        raise ValueError(
            f"{directory} is an unfinished Orbax save (its name holds {TMP_SUFFIX!r}); it was "
            "interrupted before finalizing and can't be restored. Delete it; restore an earlier "
            "checkpoint."
        )
    if not directory.exists():
        raise FileNotFoundError(_missing_message(directory))
    if not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a checkpoint directory.")
    if not (directory / META_ITEM).is_dir():
        steps = sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
        hint = (
            f" It looks like a CheckpointManager directory (steps {', '.join(steps[-5:])}); use "
            f"CheckpointManager({str(directory)!r}).restore() or restore(<dir>/<step>)."
            if steps
            else " Was it written by jaxquant.checkpoint.save? (A plain Orbax checkpoint must "
            "be read with Orbax directly.)"
        )
        raise ValueError(
            f"{directory} is not a jaxquant checkpoint: it has no {META_ITEM!r} item.{hint}"
        )


def metadata(directory: str | os.PathLike) -> dict:
    """The checkpoint's JSON description: tree structure, QArray metadata, shapes and dtypes."""
    directory = pathlib.Path(os.fspath(directory)).absolute()
    _check_directory(directory)
    ckptr = checkpointer()
    args = ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
    try:
        return read_checked_meta(lambda: ckptr.restore(directory, args)[META_ITEM], str(directory))
    finally:
        ckptr.close()


def restore(directory: str | os.PathLike, target: PyTree | None = None) -> PyTree:
    """Restores a checkpoint written by :func:`save`.

    Args:
      directory: the checkpoint directory.
      target: optional tree with the saved structure whose leaves are arrays,
        ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape`` output) or ``QArray`` of those. Each
        array is read straight into its leaf's ``sharding`` (a single device when it has
        none). Without a target the saved structure is rebuilt (dicts, lists, tuples, None,
        QArrays, arrays, scalars) on one device.

    Returns:
      The tree, bit-identical to what was saved.

    Raises:
      FileNotFoundError: no checkpoint at ``directory`` (the message names unfinished saves).
      ValueError: ``target`` differs from the checkpoint (the message names the first
        differing path), or the checkpoint is not a jaxquant checkpoint, truncated or corrupted.

    Example:
      >>> tree = restore("/tmp/ckpt")
    """
    directory = pathlib.Path(os.fspath(directory)).absolute()
    _check_directory(directory)
    ckptr = checkpointer()

    def read_meta_item():
        args = ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
        return ckptr.restore(directory, args)[META_ITEM]

    def read_arrays(abstract: dict) -> dict:
        if not (directory / ARRAYS_ITEM).is_dir():
            raise FileNotFoundError(f"missing item directory {directory / ARRAYS_ITEM}")
        args = ocp.args.Composite(**{ARRAYS_ITEM: ocp.args.StandardRestore(abstract)})
        return ckptr.restore(directory, args)[ARRAYS_ITEM]

    try:
        return restore_with(read_meta_item, read_arrays, target, str(directory))
    finally:
        ckptr.close()
