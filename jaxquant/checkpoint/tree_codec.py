"""How a pytree with :class:`~jaxquant.core.QArray` leaves is written down, and read back.

A checkpoint is a plain Orbax ``CompositeCheckpointHandler`` directory with two items:

* ``arrays``: every array, written with Orbax's ``StandardSave`` (tensorstore / OCDBT). A
  ``QArray`` is stored as its children: ``<path>.qvalue`` (packed codes), ``<path>.scale`` and,
  when asymmetric, ``<path>.zero_point``.
* ``jaxquant``: a JSON document (Orbax ``JsonSave``) describing the tree: containers, the
  ``QArray`` static metadata (qtype, logical shape, dtype, scale layout, pack axis) and every
  array's shape and dtype by name (``"bfloat16"``, ``"float8_e4m3fn"``, ``"int4"``...) and
  the sha256 of its values, checked on restore (a flipped byte in a data file is a
  :class:`~jaxquant.errors.CorruptCheckpointError`, never silently wrong numbers).

This module maps a tree to those two items (:func:`_encode`) and back: :func:`_plan` checks a
restore target against the description and returns the abstract arrays to ask Orbax for and a
function rebuilding the tree from them, so nothing is ever unpickled. The Orbax reads and writes
themselves are in :mod:`jaxquant.checkpoint.store` and :mod:`jaxquant.checkpoint.common`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxquant.core.qarray import QArray
from jaxquant.errors import CorruptCheckpointError

FORMAT = "jaxquant.checkpoint"
FORMAT_VERSION = 1
ARRAYS_ITEM = "arrays"
META_ITEM = "jaxquant"

_QARRAY_CHILDREN = ("qvalue", "scale", "zero_point")
# QArray's static fields (qtype, shape, dtype, channel_axes, group_axis, group_size, pack_axis),
# read from the dataclass so that a field added later is recorded too.
_QARRAY_FIELDS = {f.name: f for f in dataclasses.fields(QArray)}
_QARRAY_META = tuple(n for n, f in _QARRAY_FIELDS.items() if f.metadata.get("static"))
_ROOT_KEY = "_root"

PyTree = Any


# --- paths and dtypes ----------------------------------------------------------------------------


def _key_str(k) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey / FlattenedIndexKey, GetAttrKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_str(keypath) -> str:
    return "/".join(_key_str(k) for k in keypath)


def _show(path: str) -> str:
    return path or "<root>"


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def _dtype(name: str) -> np.dtype:
    try:
        return np.dtype(jnp.dtype(name))
    except TypeError as e:
        raise ValueError(f"checkpoint metadata names an unknown dtype {name!r}.") from e


def _is_qarray(x) -> bool:
    return isinstance(x, QArray)


def array_sha256(x) -> str | None:
    """The sha256 of an array's values (C order, native bytes), or None when this process does
    not hold all of it (a multi-process sharded array: nothing to compare against)."""
    if not getattr(x, "is_fully_addressable", True):
        return None
    a = np.ascontiguousarray(np.asarray(x))
    return hashlib.sha256(a.reshape(-1).view(np.uint8).data).hexdigest()


# --- encoding: tree -> (arrays to store, JSON description) ---------------------------------------


def _array_desc(x, path: str) -> dict:
    if isinstance(x, jax.ShapeDtypeStruct):
        raise ValueError(
            f"{_show(path)}: a ShapeDtypeStruct is abstract and has no values to save. Pass "
            "concrete arrays (abstract trees are for restore's target)."
        )
    dtype = x.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        raise ValueError(
            f"{_show(path)}: typed PRNG key arrays can't be saved; save "
            "jax.random.key_data(key) and rebuild it with jax.random.wrap_key_data."
        )
    desc = {"shape": [int(d) for d in x.shape], "dtype": _dtype_name(dtype)}
    digest = array_sha256(x)
    if digest is not None:
        desc["sha256"] = digest  # verified on restore: a flipped byte is an error, not a result
    return desc


def _encode_leaf(x, path: str, arrays: dict) -> dict:
    if isinstance(x, QArray):
        node = {"type": "qarray", "path": path}
        for f in _QARRAY_META:
            v = getattr(x, f)
            if isinstance(v, np.dtype):
                v = _dtype_name(v)
            elif isinstance(v, tuple):
                v = [int(a) for a in v]
            elif v is not None and not isinstance(v, (str, int, float)):
                raise ValueError(f"{_show(path)}: QArray.{f}={v!r} has no JSON form.")
            node[f] = v
        node["arrays"] = {}
        for child in _QARRAY_CHILDREN:
            a = getattr(x, child)
            node["arrays"][child] = None if a is None else _array_desc(a, f"{path}/{child}")
            if a is not None:
                arrays[(path, child)] = a
        return node
    if isinstance(x, (bool, int, float, str)) and not isinstance(x, np.generic):
        value = float.hex(x) if type(x) is float else x
        return {"type": "scalar", "path": path, "pytype": type(x).__name__, "value": value}
    if isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)):
        node = {"type": "array", "path": path, **_array_desc(x, path)}
        arrays[(path, None)] = x
        return node
    raise ValueError(
        f"{_show(path)}: can't save a leaf of type {type(x).__name__}. Leaves must be arrays, "
        "QArrays, Python scalars or strings; register custom classes as pytrees."
    )


def _is_leaf(x) -> bool:
    """True for a pytree leaf (empty containers such as ``{}`` or optax's ``EmptyState()`` are
    nodes without children, not leaves)."""
    leaves = jax.tree_util.tree_leaves(x, is_leaf=lambda y: y is None)
    return len(leaves) == 1 and leaves[0] is x


def _encode_node(x, keypath: tuple, arrays: dict) -> dict:
    path = _path_str(keypath)
    if x is None:
        return {"type": "none"}
    if _is_qarray(x) or _is_leaf(x):
        return _encode_leaf(x, path, arrays)
    kids, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    children = [_encode_node(c, keypath + tuple(kp), arrays) for kp, c in kids]
    if type(x) is dict:
        keys = [kp[0].key for kp, _ in kids]
        if not all(type(k) in (str, int) for k in keys):
            raise ValueError(f"{_show(path)}: dict keys must be str or int, got {keys!r}.")
        return {"type": "dict", "keys": keys, "children": children}
    if type(x) in (list, tuple):
        return {"type": type(x).__name__, "children": children}
    cls = type(x)
    return {
        "type": "node",
        "path": path,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "keys": [_key_str(kp[0]) for kp, _ in kids],
        "children": children,
    }


def _storage_key(path: str, child: str | None) -> tuple[str, ...]:
    parts = tuple(path.split("/")) if path else (_ROOT_KEY,)
    return parts + ((child,) if child else ())


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        d = out
        for k in key[:-1]:
            d = d.setdefault(k, {})
        d[key[-1]] = v
    return out


def encode(tree: PyTree) -> tuple[dict, dict]:
    """Splits ``tree`` into the nested dict of arrays Orbax stores and the JSON description."""
    arrays: dict = {}
    structure = _encode_node(tree, (), arrays)
    flat = {_storage_key(p, c): a for (p, c), a in arrays.items()}
    # Orbax names each array by joining its keys with "."; two leaves must never share a name.
    seen: dict[str, str] = {}
    for (p, c), key in zip(arrays, flat, strict=True):
        name = ".".join(key)
        where = _show(p) + (f" ({c})" if c else "")
        if name in seen or any(not k for k in key):
            raise ValueError(
                f"{where}: its storage name {name!r} is empty or collides with {seen.get(name)}. "
                "Rename the keys (avoid '.', '/' and empty keys, and mixing 0 and '0')."
            )
        seen[name] = where
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "jax_version": jax.__version__,
        "orbax_version": getattr(ocp, "__version__", "unknown"),
        "tree": structure,
    }
    return _nest(flat), meta


# --- decoding: JSON description (+ target) -> abstract arrays and a rebuild function -------------


_LEAF_TYPES = ("array", "qarray", "scalar")


def _walk(node: dict):
    """Every node of the JSON description, in pytree-flatten order."""
    yield node
    for c in node.get("children", ()):
        yield from _walk(c)


def _scalar_value(node: dict):
    v = node["value"]
    return {"float": float.fromhex, "int": int, "bool": bool, "str": str}[node["pytype"]](v)


def _qarray_meta(node: dict) -> dict:
    meta = {}
    for f in _QARRAY_META:
        if f in node:
            v = node[f]
        elif _QARRAY_FIELDS[f].default is not dataclasses.MISSING:  # saved before f existed
            v = _QARRAY_FIELDS[f].default
        else:
            raise ValueError(f"{_show(node['path'])}: the checkpoint's QArray lacks {f!r}.")
        if f == "dtype":
            v = _dtype(v)
        elif isinstance(v, list):
            v = tuple(int(a) for a in v)
        meta[f] = v
    return meta


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _sds(desc: dict, sharding, path: str) -> jax.ShapeDtypeStruct:
    shape = tuple(desc["shape"])
    sharding = _default_sharding() if sharding is None else sharding
    try:
        sharding.shard_shape(shape)
    except Exception as e:  # noqa: BLE001 - jax raises several types here
        raise ValueError(
            f"{_show(path)}: the target sharding {sharding} does not fit shape {shape}: {e}"
        ) from e
    return jax.ShapeDtypeStruct(shape, _dtype(desc["dtype"]), sharding=sharding)


def _target_sharding(leaf):
    s = getattr(leaf, "sharding", None)
    return s if isinstance(s, jax.sharding.Sharding) else None


def _check_leaf(node: dict, leaf, path: str) -> None:
    """Raises ``ValueError`` when a target leaf doesn't match the checkpoint's leaf."""
    kind = node["type"]
    if kind == "qarray":
        if not isinstance(leaf, QArray):
            raise ValueError(
                f"{_show(path)}: checkpoint has a QArray ({node['qtype']}, shape "
                f"{tuple(node['shape'])}), target has {type(leaf).__name__}."
            )
        if tuple(leaf.shape) != tuple(node["shape"]):
            raise ValueError(
                f"{_show(path)}: checkpoint has shape {tuple(node['shape'])}, target has "
                f"{tuple(leaf.shape)}."
            )
        want = _qarray_meta(node)
        for f in _QARRAY_META:
            if getattr(leaf, f) != want[f]:
                raise ValueError(
                    f"{_show(path)}: checkpoint QArray has {f}={want[f]!r}, target has "
                    f"{getattr(leaf, f)!r}."
                )
        for child in _QARRAY_CHILDREN:
            desc, t = node["arrays"][child], getattr(leaf, child)
            if (desc is None) != (t is None):
                raise ValueError(
                    f"{_show(path)}: checkpoint QArray {'has no' if desc is None else 'has a'} "
                    f"{child}, the target {'has one' if desc is None else 'has none'}."
                )
            if desc is not None:
                _check_array(desc, t, f"{path}/{child}")
        return
    if isinstance(leaf, QArray):
        raise ValueError(f"{_show(path)}: checkpoint has a plain {kind}, target has a QArray.")
    if kind == "scalar":
        # A Python scalar comes back as saved; jax.eval_shape turns it into a () struct.
        if tuple(getattr(leaf, "shape", ())) != ():
            raise ValueError(
                f"{_show(path)}: checkpoint has a Python {node['pytype']}, target has shape "
                f"{tuple(leaf.shape)}."
            )
        return
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise ValueError(
            f"{_show(path)}: checkpoint has an array, target has {type(leaf).__name__}. Use "
            "arrays or jax.ShapeDtypeStruct leaves (e.g. from jax.eval_shape)."
        )
    _check_array(node, leaf, path)


def _check_array(desc: dict, leaf, path: str) -> None:
    shape, tshape = tuple(desc["shape"]), tuple(leaf.shape)
    if shape != tshape:
        raise ValueError(f"{_show(path)}: checkpoint has shape {shape}, target has {tshape}.")
    if _dtype(desc["dtype"]) != np.dtype(leaf.dtype):
        raise ValueError(
            f"{_show(path)}: checkpoint has dtype {desc['dtype']}, target has "
            f"{_dtype_name(leaf.dtype)}. Restore with the saved dtype, then cast."
        )


def _match_structure(ck_paths: list[str], tg_paths: list[str]) -> None:
    if ck_paths == tg_paths:
        return
    ck_set, tg_set = set(ck_paths), set(tg_paths)
    for i in range(max(len(ck_paths), len(tg_paths))):
        c = ck_paths[i] if i < len(ck_paths) else None
        t = tg_paths[i] if i < len(tg_paths) else None
        if c == t:
            continue
        if c is not None and c not in tg_set:
            raise ValueError(
                f"{_show(c)}: the checkpoint has this leaf but the target does not (target "
                f"has {len(tg_paths)} leaves, checkpoint {len(ck_paths)}). Pass a target with "
                "the saved structure, or restore without one to see it."
            )
        if t is not None and t not in ck_set:
            raise ValueError(
                f"{_show(t)}: the target has this leaf but the checkpoint does not (target "
                f"has {len(tg_paths)} leaves, checkpoint {len(ck_paths)})."
            )
        raise ValueError(f"{_show(c or t)}: leaves are in a different order than in the target.")


def plan(meta: dict, target: PyTree | None) -> tuple[dict, Callable[[dict], PyTree]]:
    """The abstract ``arrays`` item to ask Orbax for, and a function rebuilding the tree."""
    structure = meta["tree"]
    ck_leaves = [n for n in _walk(structure) if n["type"] in _LEAF_TYPES]
    shardings: dict[str, Any] = {}  # path -> leaf whose shardings to use

    if target is not None:
        flat, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=_is_qarray)
        tg = [(_path_str(kp), leaf) for kp, leaf in flat]
        _match_structure([n["path"] for n in ck_leaves], [p for p, _ in tg])
        for node, (path, leaf) in zip(ck_leaves, tg, strict=True):
            _check_leaf(node, leaf, path)
            shardings[path] = leaf

    abstract: dict = {}
    for node in ck_leaves:
        path, leaf = node["path"], shardings.get(node["path"])
        if node["type"] == "array":
            abstract[_storage_key(path, None)] = _sds(node, _target_sharding(leaf), path)
        elif node["type"] == "qarray":
            for child in _QARRAY_CHILDREN:
                desc = node["arrays"][child]
                if desc is not None:
                    s = None if leaf is None else _target_sharding(getattr(leaf, child))
                    abstract[_storage_key(path, child)] = _sds(desc, s, f"{path}/{child}")

    def get(restored: dict, key: tuple[str, ...], desc: dict, path: str):
        d = restored
        for k in key:
            d = d[k]
        if tuple(d.shape) != tuple(desc["shape"]) or np.dtype(d.dtype) != _dtype(desc["dtype"]):
            raise ValueError(
                f"{_show(path)}: Orbax returned shape {tuple(d.shape)} {d.dtype}, the checkpoint's "
                f"metadata says {tuple(desc['shape'])} {desc['dtype']}; the checkpoint is "
                "inconsistent (were its items written by different saves?)."
            )
        want = desc.get("sha256")  # absent in checkpoints written before checksums existed
        if want is not None:
            got = array_sha256(d)
            if got is not None and got != want:
                raise CorruptCheckpointError(
                    f"array {_show(path)} fails its sha256 check (stored {want[:12]}..., read "
                    f"{got[:12]}...): a data file under {ARRAYS_ITEM}/ is corrupted (a flipped "
                    "or overwritten byte). Restore an earlier checkpoint or save it again."
                )
        return d

    def build_leaf(node: dict, restored: dict):
        path = node["path"]
        if node["type"] == "scalar":
            return _scalar_value(node)
        if node["type"] == "array":
            return get(restored, _storage_key(path, None), node, path)
        kids = {
            c: None
            if node["arrays"][c] is None
            else get(restored, _storage_key(path, c), node["arrays"][c], f"{path}/{c}")
            for c in _QARRAY_CHILDREN
        }
        return QArray(**kids, **_qarray_meta(node))

    def build_node(node: dict, restored: dict):
        kind = node["type"]
        if kind == "none":
            return None
        if kind in _LEAF_TYPES:
            return build_leaf(node, restored)
        children = [build_node(c, restored) for c in node["children"]]
        if kind == "dict":
            return dict(zip(node["keys"], children, strict=True))
        if kind == "list":
            return children
        if kind == "tuple":
            return tuple(children)
        raise AssertionError(kind)  # custom nodes are rejected before restoring

    if target is None:
        for n in _walk(structure):
            if n["type"] == "node":
                raise ValueError(
                    f"{_show(n['path'])}: the checkpoint holds a custom pytree node ({n['class']}), "
                    "which is rebuilt only from a target (nothing is unpickled). Pass target=, "
                    "e.g. jax.eval_shape(init_fn) or the live tree."
                )

        def rebuild(restored: dict) -> PyTree:
            return build_node(structure, restored)

    else:

        def rebuild(restored: dict) -> PyTree:
            return jax.tree_util.tree_unflatten(
                treedef, [build_leaf(n, restored) for n in ck_leaves]
            )

    return _nest(abstract), rebuild


def check_meta(meta: Any, where: str) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "tree" not in meta:
        raise CorruptCheckpointError(
            f"{where}: the {META_ITEM!r} item is not jaxquant checkpoint metadata. Was this "
            "checkpoint written by jaxquant.checkpoint.save?"
        )
    version = meta.get("version", 0)
    if not isinstance(version, int) or not isinstance(meta["tree"], dict):
        raise CorruptCheckpointError(
            f"{where}: the checkpoint metadata is damaged (version {version!r}); restore an "
            "earlier checkpoint or save it again."
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: checkpoint format version {meta['version']} is newer than this jaxquant "
            f"reads ({FORMAT_VERSION}); upgrade jaxquant."
        )
    return meta
