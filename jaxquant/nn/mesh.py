"""Device meshes and logical axes: where each param of a (quantized) model lives on a mesh.

The MaxText recipe, with flax's logical-axis helpers:

1. :func:`make_mesh` builds a ``jax.sharding.Mesh`` from a spec such as
   ``"data=2,fsdp=2,tensor=2"``. The mesh always has the three axes of :data:`MESH_AXES` (the
   ones the spec leaves out have size 1), so one rules table fits every mesh.
2. Each param carries *logical* axis names (:data:`TRANSFORMER_LOGICAL_AXES`: a kernel
   ``q_proj [D, H*hd]`` is ``("embed", "heads")``), looked up by its path.
3. :data:`LOGICAL_AXIS_RULES` maps logical names to mesh axes (``embed -> fsdp``,
   ``heads / kv / mlp / vocab -> tensor``, ``batch -> (data, fsdp)``), through
   ``flax.linen.logical_to_mesh_axes``.
4. :func:`param_shardings` gives the ``NamedSharding`` tree of a param tree, float or serving:
   a QArray leaf gets a QArray of shardings whose codes, scales and zero points agree
   (:func:`jaxquant.core.sharding.qarray_partition_specs`).

Lingo: ``data`` splits the batch (params replicated), ``fsdp`` splits the batch *and* the
params' ``embed`` axis (ZeRO-3: XLA gathers a layer's weights when it needs them), ``tensor``
splits heads, MLP hidden units and the vocabulary (Megatron-style tensor parallelism).

Example:
  >>> mesh = make_mesh("data=2,fsdp=2,tensor=2")          # 8 devices
  >>> shardings = param_shardings(params, mesh)           # same tree, NamedSharding leaves
  >>> params = jax.device_put(params, shardings)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant.core.qarray import QArray
from jaxquant.core.sharding import ShardingError, axis_split, qarray_partition_specs

__all__ = [
    "LOGICAL_AXIS_RULES",
    "abstract_on",
    "MESH_AXES",
    "TRANSFORMER_LOGICAL_AXES",
    "ShardingError",
    "batch_sharding",
    "logical_axes",
    "make_mesh",
    "param_partition_specs",
    "param_shardings",
    "parse_mesh_spec",
    "place",
    "replicated",
    "shard_params",
]

MESH_AXES = ("data", "fsdp", "tensor")
"""The mesh axes, in device order: ``data`` outermost (across hosts / slices), ``tensor``
innermost (the fastest links)."""

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)
"""``(logical name, mesh axes)`` pairs (flax's ``logical_axis_rules`` format)."""

TRANSFORMER_LOGICAL_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"(^|/)embed/embedding$", ("vocab", "embed")),
    (r"(^|/)attn/q_proj/kernel$", ("embed", "heads")),
    (r"(^|/)attn/(k|v)_proj/kernel$", ("embed", "kv")),
    (r"(^|/)attn/o_proj/kernel$", ("heads", "embed")),
    (r"(^|/)mlp/(gate|up)_proj/kernel$", ("embed", "mlp")),
    (r"(^|/)mlp/down_proj/kernel$", ("mlp", "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    (r"norm/scale$", ("norm",)),
    # the KV cache (nn.kv_cache.KVCache): k / v [B, T, KV, hd] (int4: hd / 2 bytes), scales
    # [B, T, KV, 1]
    (r"(^|/)layers/\d+/(k|v|k_scale|v_scale)$", ("batch", "length", "kv_heads", "head_dim")),
)
"""``(path regex, logical axes)`` of :class:`~jaxquant.nn.Transformer`'s params and KV cache
(first match wins; a QArray takes its logical tensor's axes). A leaf that no pattern matches, or
whose rank differs, is replicated. Optimizer states mirror the params' paths
(``.../mu/block_0/attn/q_proj/kernel``), so they match the same patterns."""


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` -> ``{"data": 2, "fsdp": 2, "tensor": 2}`` (all of
    :data:`MESH_AXES`, missing ones 1).

    Raises:
      ValueError: bad syntax, an unknown or repeated axis, or a size below 1.
    """
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        text = str(spec).strip()
        if not text:
            raise ValueError("empty mesh spec; write e.g. data=2,fsdp=2,tensor=2.")
        items = []
        for part in text.split(","):
            m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(\d+)\s*", part)
            if m is None:
                raise ValueError(f"mesh spec {text!r}: cannot read {part.strip()!r}; write "
                                 "AXIS=SIZE pairs separated by commas, e.g. data=2,tensor=4.")
            items.append((m.group(1), int(m.group(2))))
    sizes = {}
    for name, size in items:
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec: unknown axis {name!r}; the axes are "
                             f"{', '.join(MESH_AXES)}.")
        if name in sizes:
            raise ValueError(f"mesh spec: axis {name!r} given twice.")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"mesh spec: axis {name!r} needs a size >= 1, got {size!r}.")
        sizes[name] = int(size)
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int], *, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes :data:`MESH_AXES` (``Auto`` axis types: XLA propagates shardings).

    Args:
      spec: ``"data=2,fsdp=2,tensor=2"`` or ``{"tensor": 8}``; the sizes' product must be the
        number of devices (every process's devices in a multi-process run).
      devices: default ``jax.devices()``.

    Raises:
      ValueError: see :func:`parse_mesh_spec`, or a product that differs from the device count.

    Example:
      >>> make_mesh("fsdp=4,tensor=2").shape
      {'data': 1, 'fsdp': 4, 'tensor': 2}
    """
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    total = math.prod(sizes.values())
    if total != len(devices):
        given = ",".join(f"{a}={s}" for a, s in sizes.items() if s > 1) or "1"
        raise ValueError(f"mesh {given} has {total} devices, but there are {len(devices)} "
                         f"({devices[0].platform}); make the sizes multiply to {len(devices)}.")
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, auto)  # topology-aware order on TPU
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=auto)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2, *, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """A batch ``[B, ...]`` split over the ``batch`` rule's mesh axes (``data`` and ``fsdp``)."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_qarray(x) -> bool:
    return isinstance(x, QArray)


def _compile(table):
    return [(re.compile(p), tuple(axes)) for p, axes in table]


def _axes_of(name: str, ndim: int, compiled) -> tuple[str, ...] | None:
    for pat, axes in compiled:
        if pat.search(name):
            return axes if len(axes) == ndim else None
    return None


def _ndim(leaf) -> int:
    return len(leaf.shape) if _is_qarray(leaf) else np.ndim(leaf)


def logical_axes(params: Any, table=TRANSFORMER_LOGICAL_AXES) -> dict[str, tuple | None]:
    """``{path: logical axis names}`` of every leaf (None: replicated).

    A QArray leaf gets the axes of its logical tensor (``QArray.shape``).

    Example:
      >>> logical_axes(params)["block_0/attn/q_proj/kernel"]
      ('embed', 'heads')
    """
    compiled = _compile(table)
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_qarray)
    return {_path_str(p): _axes_of(_path_str(p), _ndim(leaf), compiled) for p, leaf in flat}


def _leaf_spec(name, leaf, axes, mesh_shape, rules, strict):
    ndim = _ndim(leaf)
    spec = P() if axes is None else nn.logical_to_mesh_axes(axes, rules)
    entries = list(spec) + [None] * (ndim - len(spec))
    if _is_qarray(leaf):
        return qarray_partition_specs(leaf, P(*entries), mesh_shape, strict=strict, what=name)
    shape = np.shape(leaf)
    for a, e in enumerate(entries):
        n = axis_split(e, mesh_shape)
        if shape[a] % n:
            if strict:
                raise ShardingError(
                    f"{name}: cannot shard axis {a} ({axes[a]!r}, size {shape[a]}) over mesh "
                    f"axes {e!r} ({n} shards): not a multiple. Use a mesh with fewer shards on "
                    "that axis, or strict=False to replicate it.")
            entries[a] = None
    return P(*entries)


def param_partition_specs(
    params: Any,
    mesh: Mesh,
    *,
    rules=LOGICAL_AXIS_RULES,
    table=TRANSFORMER_LOGICAL_AXES,
    strict: bool = True,
) -> Any:
    """``PartitionSpec`` s of a param tree (QArray leaves: a QArray of specs).

    Args:
      params: float or serving params (arrays, ``jax.ShapeDtypeStruct`` s or QArrays of them).
      mesh: the mesh (its axis sizes decide what divides).
      rules: logical name -> mesh axes (:data:`LOGICAL_AXIS_RULES`).
      table: path regex -> logical axes (:data:`TRANSFORMER_LOGICAL_AXES`).
      strict: raise :class:`~jaxquant.core.sharding.ShardingError` when a param's axis cannot
        split (not a multiple of its shards; packed codes or groups cut); False replicates it.

    Raises:
      ShardingError: ``strict`` and an axis cannot split; the message names the param.
    """
    mesh_shape = dict(mesh.shape)
    compiled = _compile(table)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_qarray)
    specs = []
    for path, leaf in flat:
        name = _path_str(path)
        axes = _axes_of(name, _ndim(leaf), compiled)
        specs.append(_leaf_spec(name, leaf, axes, mesh_shape, rules, strict))
    return jax.tree_util.tree_unflatten(treedef, specs)


def _to_shardings(specs: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def param_shardings(
    params: Any,
    mesh: Mesh,
    *,
    rules=LOGICAL_AXIS_RULES,
    table=TRANSFORMER_LOGICAL_AXES,
    strict: bool = True,
) -> Any:
    """``NamedSharding`` s of a param tree, same structure (see :func:`param_partition_specs`).

    Example:
      >>> sh = param_shardings(serve_params, make_mesh("fsdp=2,tensor=4"))
      >>> sh["block_0"]["attn"]["q_proj"]["kernel"].scale.spec    # an int4 QArray's scales
      PartitionSpec('fsdp', 'tensor')
    """
    specs = param_partition_specs(params, mesh, rules=rules, table=table, strict=strict)
    return _to_shardings(specs, mesh)


def place(tree: Any, shardings: Any) -> Any:
    """``tree`` placed by ``shardings`` (same structure; QArray leaves take QArrays of
    shardings). In one process this is ``jax.device_put``; with several processes each leaf
    must hold the same global value on every process, and each process puts only its own
    devices' blocks (``jax.make_array_from_callback``)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        a = np.asarray(x)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(one, tree, shardings)


def abstract_on(tree: Any, shardings: Any) -> Any:
    """``tree``'s shapes and dtypes as ``jax.ShapeDtypeStruct`` s carrying ``shardings``: the
    ``target`` of :func:`jaxquant.checkpoint.restore` that reads each array straight into its
    shards (a checkpoint saved from any mesh restores onto any other).

    Example:
      >>> like = jax.eval_shape(lambda: serve_params)
      >>> target = abstract_on(like, param_shardings(like, make_mesh("tensor=8")))
      >>> params = jaxquant.checkpoint.restore(path, target)
    """
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings)


def shard_params(params: Any, mesh: Mesh, **kwargs) -> Any:
    """``params`` placed by :func:`param_shardings` (``**kwargs``: its options)."""
    return place(params, param_shardings(params, mesh, **kwargs))
