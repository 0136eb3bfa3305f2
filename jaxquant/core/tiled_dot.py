"""The weight-only product for few activation rows: dequantize one tile of the weight at a time.

Lingo: the float **lhs** (activations) has few rows ``M`` (decode: ``M`` = batch); the **rhs** is
a :class:`QArray` weight. The weight's leading axis (axis 0, the major axis of its codes in
memory) is cut into ``n`` tiles of ``c`` rows, each small enough to stay in cache.

The reference path dequantizes the whole weight and then runs one float dot. On XLA:CPU the dot
is a library call, so the float weight is written to memory in full (4 bytes per element, more
than the codes it came from) and read back: weight-only decode was no faster than float. Here a
``lax.scan`` / ``lax.map`` over the tiles dequantizes a tile (int4 nibbles unpacked, group
scales applied) and multiplies it right away, so only the codes travel from memory and the float
tile lives in cache:

* leading axis **contracting** (a Dense kernel ``[K, N]``): the lhs is cut along the matching
  axis too, and the tiles' partial products are summed in float32;
* leading axis **free** (a tied embedding ``[V, D]`` used as the head): each tile gives its own
  slice of the output, and the slices are joined.

Sub-byte codes packed along a contracting axis are not interleaved back into place: byte ``i``
holds elements ``k i + j`` (``j < k = 8 // bits``), so the product is the sum over the ``k``
code planes, ``sum_j x[..., j::k] . dequantize(plane_j)``, each plane a plain shift and mask of
the bytes (:func:`~jaxquant.core.packing.unpack_plane`).

A symmetric scale per output channel (int8 per column, the per-row head) is applied to the
tile's product rather than to each of its elements.

It is the reference product up to float reassociation (the sum over ``K`` is split into partial
sums). Tiles hold whole groups and whole packed bytes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.core.packing import unpack_plane
from jaxquant.core.qarray import QArray
from jaxquant.core.qtypes import get_qtype

# Backends where the tiled path is used. Measured on XLA:CPU only; elsewhere (no GPU was at
# hand) the reference path stays, where XLA:GPU can fuse the dequantization into the GEMM.
TILED_BACKENDS = ("cpu",)
# Tiled only when the lhs has at most this many rows (product of its non-contracting sizes):
# beyond that the dot is compute bound and one dequantization of the weight is amortised.
MAX_TILED_ROWS = 16
# Target elements per float tile: 64 Ki f32 = 256 KiB, within a core's L2.
TILE_ELEMENTS = 1 << 16


def tiles_enabled(tiling: str) -> bool:
    """Whether a :class:`~jaxquant.core.dot_config.DotGeneralConfig` ``tiling`` mode turns the
    tiled kernels on here: ``"always"``, or ``"auto"`` on a backend in :data:`TILED_BACKENDS`."""
    return tiling == "always" or (tiling == "auto" and jax.default_backend() in TILED_BACKENDS)


def tile_rows(q: QArray, target: int | None = None) -> int | None:
    """Rows ``c`` of ``q``'s leading axis per tile, or None when it can't be tiled in >= 2.

    ``c`` divides ``shape[0]``, is a multiple of the group size (when grouped along axis 0) and of
    the codes per byte (when packed along axis 0), and is the largest such ``c`` with
    ``c * prod(shape[1:]) <= target`` (at least one unit).
    """
    if not q.shape:
        return None
    target = TILE_ELEMENTS if target is None else target
    length, rest = q.shape[0], math.prod(q.shape[1:])
    unit = 1
    if q.group_axis == 0:
        unit = math.lcm(unit, q.group_size)
    if q.pack_axis == 0:
        unit = math.lcm(unit, 8 // get_qtype(q.qtype).storage_bits)
    limit = max(unit, target // max(rest, 1))
    fits = [c for c in range(unit, min(limit, length // 2) + 1, unit) if length % c == 0]
    return max(fits) if fits else None


def _split_leading(a: jax.Array | None, n: int):
    """``a [L', ...] -> [n, L'/n, ...]``; None (and axis-0 broadcasts) stay whole."""
    if a is None or a.shape[0] == 1:
        return None
    return a.reshape((n, a.shape[0] // n) + a.shape[1:])


def _planes(q: QArray, contracting) -> list[QArray] | None:
    """``q``'s code planes as unpacked QArrays over the packed axis / k, when that axis is
    contracted, unpadded, and its groups (if any) hold whole bytes; else None."""
    a = q.pack_axis
    if a is None or a not in contracting:
        return None
    qt = get_qtype(q.qtype)
    k = 8 // qt.storage_bits
    if q.qvalue.shape[a] * k != q.shape[a] or (q.group_axis == a and q.group_size % k):
        return None
    group = q.group_size // k if q.group_axis == a else q.group_size
    return [
        dataclasses.replace(
            q, qvalue=unpack_plane(q.qvalue, qt.storage_bits, j, signed=qt.kind == "int"),
            shape=tuple(q.qvalue.shape), group_size=group, pack_axis=None)
        for j in range(k)
    ]


def _dot(x, w: QArray, dn, precision, preferred_element_type, ftype):
    """``x . w.dequantize(ftype)``, summing over the code planes of a packed ``w``.

    A symmetric int / fp8 scale that is constant along the contraction (one per output channel)
    multiplies the product instead of every weight element.
    """
    (lc, rc), _ = dn
    planes = _planes(w, rc)
    if planes is None:
        kind = get_qtype(w.qtype).kind
        if w.zero_point is None and kind != "codebook" and all(w.scale.shape[a] == 1 for a in rc):
            rfree = [n for a, n in enumerate(w.scale.shape) if a not in rc]
            y = lax.dot_general(x, w.codes().astype(ftype), dn, precision,
                                preferred_element_type=jnp.float32)
            s = w.scale.astype(jnp.float32).reshape(rfree)  # the output's trailing (rhs) axes
            return (y * s).astype(preferred_element_type or jnp.result_type(x.dtype, ftype))
        return lax.dot_general(x, w.dequantize(ftype), dn, precision,
                               preferred_element_type=preferred_element_type)
    k, la = len(planes), lc[rc.index(w.pack_axis)]
    xk = x.reshape(x.shape[:la] + (x.shape[la] // k, k) + x.shape[la + 1 :])
    y = None
    for j, p in enumerate(planes):
        yj = lax.dot_general(lax.index_in_dim(xk, j, la + 1, keepdims=False), p.dequantize(ftype),
                             dn, precision, preferred_element_type=jnp.float32)
        y = yj if y is None else y + yj
    return y.astype(preferred_element_type or jnp.result_type(x.dtype, ftype))


def tiled_weight_dot(lhs, rq: QArray, dn, precision, preferred_element_type, ftype, *,
                     tiling: str = "auto"):
    """``lax.dot_general(lhs, rq.dequantize(ftype), dn)`` one weight tile at a time.

    Args:
      lhs: float activations.
      rq: the quantized weight (rhs).
      dn: normalized dimension numbers.
      precision, preferred_element_type: as for ``lax.dot_general``.
      ftype: the float dtype the weight dequantizes to.
      tiling: the config's mode (:func:`tiles_enabled`).

    Returns:
      The product, or None when this path doesn't apply (tiling off: see
      :func:`tiles_enabled`, batch axes, more than
      :data:`MAX_TILED_ROWS` lhs rows, or a leading axis that can't be cut in two or more tiles);
      the caller then takes the reference path.
    """
    (lc, rc), (lb, rb) = dn
    if lb or rb or isinstance(lhs, QArray) or not tiles_enabled(tiling):
        return None
    rows = math.prod(n for a, n in enumerate(lhs.shape) if a not in lc)
    c = tile_rows(rq)
    if rows > MAX_TILED_ROWS or c is None:
        return None
    n = rq.shape[0] // c
    parts = {f: _split_leading(getattr(rq, f), n) for f in ("qvalue", "scale", "zero_point")}

    def tile(sliced: dict) -> QArray:
        fields = {f: sliced[f] if parts[f] is not None else getattr(rq, f) for f in parts}
        return dataclasses.replace(rq, **fields, shape=(c,) + rq.shape[1:])

    xs = {f: p for f, p in parts.items() if p is not None}
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, ftype)
    if 0 in rc:  # leading axis contracted: partial sums over the tiles
        la = lc[rc.index(0)]
        xl = lhs.reshape(lhs.shape[:la] + (n, c) + lhs.shape[la + 1 :])
        xl = jnp.moveaxis(xl, la, 0)

        def body(acc, step):
            x_i, sliced = step
            return acc + _dot(x_i, tile(sliced), dn, precision, jnp.float32, ftype), None

        out_shape = jax.eval_shape(
            lambda: _dot(xl[0], tile({f: p[0] for f, p in xs.items()}), dn, None, None, ftype)
        ).shape
        y, _ = lax.scan(body, varying_zeros(out_shape, xl, *xs.values()), (xl, xs))
        return y.astype(out_dtype)
    # Leading axis free: each tile is a slice of the output along that axis.
    ys = lax.map(
        lambda sliced: _dot(lhs, tile(sliced), dn, precision, preferred_element_type, ftype), xs
    )  # [n, ..., c, ...]
    pos = lhs.ndim - len(lc)  # output axis of the weight's first free axis (its axis 0)
    ys = jnp.moveaxis(ys, 0, pos)
    return ys.reshape(ys.shape[:pos] + (n * c,) + ys.shape[pos + 2 :]).astype(out_dtype)


def varying_zeros(shape, *operands) -> jax.Array:
    """float32 zeros of ``shape`` typed like the sums of ``operands``: inside ``jax.shard_map``
    they vary over the operands' mesh axes, as a scan's carry must (a plain ``jnp.zeros`` does
    not, and the scan refuses it); elsewhere they are plain zeros."""
    z = jnp.zeros(shape, jnp.float32)
    for a in operands:
        z = z + jnp.zeros_like(a, dtype=jnp.float32, shape=())
    return z
