"""How a :class:`QArray` shards: one ``PartitionSpec`` for the logical tensor, consistent specs
for its codes, scales and zero points.

Lingo: a *logical spec* names, for each axis of the float tensor ``x`` (``QArray.shape``), the
mesh axes that split it (``P("fsdp", "tensor")`` for a kernel ``[d_in, d_out]``). Its QArray is
split the same way:

- ``qvalue`` takes the logical spec as is. Packed sub-byte codes (``pack_axis``) split along the
  packed axis only in whole bytes: each of the ``n`` shards must hold ``shape[a] / n`` codes, a
  multiple of the codes per byte, so shard boundaries fall between bytes.
- ``scale`` / ``zero_point`` take the logical spec on their full-size (channel) axes, and on
  the grouped axis only when each shard holds whole groups (``shape[a] / group_size`` groups
  divisible by ``n``); their size-1 (shared) axes are replicated.

An axis that cannot be split that way is either an error (:class:`ShardingError`, naming the
reason) or, with ``strict=False``, replicated for all three arrays alike, so one QArray never
mixes layouts. This module is pure JAX: it never moves data.

Inside ``jax.shard_map`` a QArray's children are the local blocks while its static ``shape`` is
still the global one; :func:`local_qarray` gives the QArray of the block (call it on each
QArray argument first thing in the mapped function).

Example:
  >>> q = quantize(jnp.ones((256, 64)), QuantSpec(qtype="int4", channel_axes=(1,), group_size=128))
  >>> specs = qarray_partition_specs(q, P("fsdp", "tensor"), {"fsdp": 2, "tensor": 4})
  >>> specs.qvalue, specs.scale
  (PartitionSpec('fsdp', 'tensor'), PartitionSpec('fsdp', 'tensor'))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from jax.sharding import PartitionSpec as P

from jaxquant.core.qarray import QArray
from jaxquant.core.qtypes import get_qtype
from jaxquant.errors import JaxquantError

__all__ = [
    "ShardingError",
    "axis_split",
    "check_split",
    "local_qarray",
    "qarray_partition_specs",
]


class ShardingError(JaxquantError):
    """A sharding that cannot be honoured (an axis not divisible by its mesh axes, a packed
    axis split inside a byte, a grouped axis split inside a group)."""


def _entries(spec: P, ndim: int) -> list:
    entries = list(spec)
    if len(entries) > ndim:
        raise ShardingError(f"PartitionSpec {spec} has {len(entries)} entries for a rank-{ndim} "
                            "tensor; give at most one entry per axis.")
    return entries + [None] * (ndim - len(entries))


def axis_split(entry, mesh_shape: Mapping[str, int]) -> int:
    """Number of shards a PartitionSpec entry (None, a mesh axis, or a tuple of them) makes."""
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    unknown = [n for n in names if n not in mesh_shape]
    if unknown:
        raise ShardingError(f"mesh axis {unknown[0]!r} is not in the mesh {dict(mesh_shape)}.")
    return math.prod(int(mesh_shape[n]) for n in names)


def check_split(shape, spec: P, mesh_shape: Mapping[str, int], what: str = "array") -> None:
    """Raises :class:`ShardingError` unless every axis of ``shape`` divides into its shards."""
    for a, e in enumerate(_entries(spec, len(shape))):
        n = axis_split(e, mesh_shape)
        if shape[a] % n:
            raise ShardingError(f"{what}: axis {a} of size {shape[a]} does not split into {n} "
                                f"shards over mesh axes {e!r}; pick a mesh whose {e!r} size "
                                f"divides {shape[a]}, or map this axis to no mesh axis.")


def _why_not(q: QArray, axis: int, n: int) -> str | None:
    """Why axis ``axis`` of ``q`` cannot split into ``n`` shards (None: it can)."""
    size = q.shape[axis]
    if size % n:
        return f"axis {axis} has {size} elements, not a multiple of {n} shards"
    if axis == q.pack_axis:
        k = 8 // get_qtype(q.qtype).storage_bits
        if size % (n * k):
            return (f"{q.qtype} codes are packed {k} per byte along axis {axis}: {size} codes "
                    f"-> {size // n} per shard, not whole bytes")
    if axis == q.group_axis and q.group_size:
        groups = size // q.group_size
        if groups % n:
            return (f"axis {axis} holds {groups} groups of {q.group_size}: {n} shards would "
                    "cut a group (its scale would be split)")
    return None


def qarray_partition_specs(
    q: QArray, spec: P, mesh_shape: Mapping[str, int], *, strict: bool = True,
    what: str = "QArray",
) -> QArray:
    """Specs for ``q``'s arrays given the logical tensor's spec.

    Args:
      q: the QArray (concrete, or of ``jax.ShapeDtypeStruct``).
      spec: ``PartitionSpec`` of the logical tensor ``[*q.shape]``.
      mesh_shape: ``{mesh axis: size}`` (``mesh.shape``).
      strict: raise :class:`ShardingError` for an axis that cannot split (default); False
        replicates that axis in codes, scales and zero points alike.
      what: a name for the messages (the param's path).

    Returns:
      A QArray with the same static fields whose children are ``PartitionSpec`` s (``None``
      for a missing zero point): a tree ``jax.tree.map`` can turn into ``NamedSharding`` s.

    Raises:
      ShardingError: ``strict`` and an axis cannot split (the message says why).
    """
    entries = _entries(spec, q.ndim)
    for a, e in enumerate(entries):
        n = axis_split(e, mesh_shape)
        if n == 1:
            continue
        reason = _why_not(q, a, n)
        if reason is None:
            continue
        if strict:
            raise ShardingError(
                f"{what}: cannot shard axis {a} over mesh axes {e!r} ({n} shards): {reason}. "
                "Use a mesh with fewer shards on that axis, a larger group size, or map the "
                "axis to no mesh axis (strict=False replicates it).")
        entries[a] = None
    code_spec = P(*entries)
    scale_shape = tuple(q.scale.shape)
    scale_spec = P(*(e if scale_shape[a] > 1 else None for a, e in enumerate(entries)))
    return dataclasses.replace(
        q, qvalue=code_spec, scale=scale_spec,
        zero_point=None if q.zero_point is None else scale_spec)


def local_qarray(q: QArray) -> QArray:
    """The QArray whose static ``shape`` matches its (local) arrays.

    Inside ``jax.shard_map`` the children are one device's block of the codes and scales, but
    ``shape`` is static and still global. This derives the block's logical shape from the codes
    (times the codes per byte along ``pack_axis``; blocks made by
    :func:`qarray_partition_specs` hold whole bytes and whole groups). Outside shard_map it
    returns ``q`` unchanged.

    Example:
      >>> def f(x, w):                                    # inside jax.shard_map
      ...     return jq.dot_general(x, local_qarray(w), dn, config=cfg)
    """
    shape = list(q.qvalue.shape)
    if q.pack_axis is not None:
        a = q.pack_axis
        k = 8 // get_qtype(q.qtype).storage_bits
        shape[a] = min(q.shape[a], shape[a] * k)
    shape = tuple(int(s) for s in shape)
    if shape == tuple(q.shape):
        return q
    if q.group_axis is not None and q.group_size:
        a = q.group_axis
        if q.scale.shape[a] * q.group_size != shape[a]:
            raise ShardingError(
                f"local_qarray: the block holds {shape[a]} elements along axis {a} but "
                f"{q.scale.shape[a]} groups of {q.group_size}: the QArray was split inside a "
                "group. Shard it with qarray_partition_specs (whole groups).")
    return dataclasses.replace(q, shape=shape)
