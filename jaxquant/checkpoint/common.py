"""What :mod:`~jaxquant.checkpoint.store` and :mod:`~jaxquant.checkpoint.manager` share.

The two Orbax items of a jaxquant checkpoint, the arguments that write them, and the restore
sequence (read the JSON description, check the target, read the arrays) with errors that say
what to do. Both modules import this one; neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orbax.checkpoint as ocp

from jaxquant.checkpoint.tree_codec import ARRAYS_ITEM, META_ITEM, check_meta, plan
from jaxquant.errors import CorruptCheckpointError

try:
    TMP_SUFFIX = ocp.path.atomicity_types.TMP_DIR_SUFFIX
except AttributeError:  # pragma: no cover - older/newer orbax layouts
    TMP_SUFFIX = ".orbax-checkpoint-tmp"

PyTree = Any


def read_checked_meta(read: Callable[[], Any], where: str) -> dict:
    try:
        meta = read()
    except Exception as e:  # noqa: BLE001 - orbax/json raise many types; re-raise one clear one
        raise CorruptCheckpointError(
            f"{where}: could not read the checkpoint metadata ({type(e).__name__}: "
            f"{first_line(e)}). The checkpoint is truncated or corrupted; restore an earlier "
            "one or save it again."
        ) from e
    return check_meta(meta, where)


def restore_with(
    read_meta: Callable[[], Any],
    read_arrays: Callable[[dict], dict],
    target: PyTree | None,
    where: str,
) -> PyTree:
    """Shared by :func:`restore` and the manager: read metadata, check target, read arrays."""
    meta = read_checked_meta(read_meta, where)
    try:
        abstract, rebuild = plan(meta, target)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a damaged description
        raise CorruptCheckpointError(
            f"{where}: the checkpoint metadata is damaged ({type(e).__name__}: {first_line(e)}). "
            "Restore an earlier checkpoint or save it again."
        ) from e
    restored: dict = {}
    if abstract:
        try:
            restored = read_arrays(abstract)
        except Exception as e:  # noqa: BLE001 - tensorstore errors surface as many types
            raise CorruptCheckpointError(
                f"{where}: could not read the checkpoint's arrays ({type(e).__name__}: "
                f"{first_line(e)}). The checkpoint is truncated or corrupted (a data file is "
                "missing or cut short); restore an earlier checkpoint or save it again."
            ) from e
    try:
        return rebuild(restored)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{where}: {e}") from e
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise CorruptCheckpointError(
            f"{where}: the checkpoint metadata does not match its arrays ({type(e).__name__}: "
            f"{first_line(e)}). Restore an earlier checkpoint or save it again."
        ) from e


def first_line(e: BaseException, limit: int = 600) -> str:
    """The gist of an error: its first line, without tensorstore's long spec dump."""
    s = str(e).strip().splitlines()
    s = s[0] if s else ""
    s = s.split(" [tensorstore_spec")[0]
    return s if len(s) <= limit else s[:limit] + "..."


def checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_args(arrays: dict, meta: dict) -> ocp.args.Composite:
    items = {META_ITEM: ocp.args.JsonSave(meta)}
    if arrays:
        items[ARRAYS_ITEM] = ocp.args.StandardSave(arrays)
    return ocp.args.Composite(**items)
