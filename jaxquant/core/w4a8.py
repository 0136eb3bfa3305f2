"""W4A8 for few activation rows: sub-byte weight codes times int8 activation codes, per tile.

Lingo: the **lhs** holds the activations, already quantized to int8 with one scale per row
(dynamic, :func:`~jaxquant.core.dot_general.dot_general`'s lhs spec); ``R`` is its number of rows
(decode: the batch). The **rhs** is a served weight, a 2-D :class:`QArray` of symmetric int codes
(int4 / int3 / int2, packed ``k = 8 // storage_bits`` to a byte along the contracting axis) with
a scale per group of ``g`` along the contraction (or one per output column). Its leading axis is
cut into tiles of ``c`` rows (:func:`~jaxquant.core.tiled_dot.tile_rows`) and a ``lax.scan`` /
``lax.map`` visits them, so only the packed codes travel from memory.

In each tile, for each of the ``k`` code planes ``j`` (elements ``k i + j`` of the contraction,
a shift and a mask of the bytes, no interleave), the codes are widened to int8 and multiplied
with the matching int8 activation codes, ``int8 x int8 -> int32``, with the groups as a batch
axis of the integer dot: one exact int32 partial sum per (group, row, column). Then, in float32::

    y[r, n] = sx[r] * sum_groups s[group, n] * sum_j P_j[group, r, n]

where ``sx`` is the activation scale of row ``r`` and ``s`` the weight's group scale. Integer
sums are exact, so the result is :func:`~jaxquant.core.dot_general.dot_general_reference`'s
(dequantize both, float dot) up to float reassociation.

The activations are quantized once, before the loop (not per tile), and split into their planes
and groups once. A single lhs row is padded to two: XLA:CPU's one-row int8 dot is a slow path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.core.packing import unpack_plane
from jaxquant.core.qarray import QArray
from jaxquant.core.qtypes import get_qtype
from jaxquant.core.tiled_dot import varying_zeros


def _weight_layout(rq: QArray, rc: int) -> tuple[int, int] | None:
    """``(k, g)``: codes per byte (packed along the contraction) and the group size (the
    contraction length when the scale is per output column); None when the weight doesn't fit
    this path (not packed sub-byte symmetric int codes, or packed along another axis)."""
    qt = get_qtype(rq.qtype)
    if qt.kind != "int" or rq.zero_point is not None or rq.ndim != 2:
        return None
    k = qt.codes_per_byte
    if rq.pack_axis != rc or rq.qvalue.shape[rc] * k != rq.shape[rc]:
        return None
    if rq.scale.shape[rc] == 1:
        g = rq.shape[rc]
    elif rq.group_axis == rc and rq.scale.shape[rc] * rq.group_size == rq.shape[rc]:
        g = rq.group_size
    else:
        return None
    return (k, g) if g % k == 0 else None


def _planes(codes: jax.Array, k: int, bits: int) -> list[jax.Array]:
    """The ``k`` int8 code planes of packed ``codes``; each keeps the packed shape (plane ``j``
    holds elements ``k i + j`` of the packed axis)."""
    return [unpack_plane(codes, bits, j, signed=True) for j in range(k)]


def tiled_int_dot(lq: QArray, rq: QArray, dn, out_dtype, *, max_rows: int, tile: int | None):
    """``dequantize(lq) . dequantize(rq)`` as tiled int8 products with int32 group sums.

    Args:
      lq: int8 activations ``[..., K]`` (any rank; one contracting axis), symmetric, one scale
        per row (constant over the contraction).
      rq: the weight, 2-D, contracting axis 0 (a Dense kernel ``[K, N]``) or 1 (a tied head
        ``[V, K]``), symmetric int codes of at most 8 bits.
      dn: normalized dimension numbers.
      out_dtype: the output dtype.
      max_rows: the most lhs rows (product of its free sizes) this path takes.
      tile: the weight rows per tile (from :func:`~jaxquant.core.tiled_dot.tile_rows`), or None
        when the weight can't be tiled (then the path doesn't apply).

    Returns:
      ``[lhs_free..., rhs_free]`` in ``out_dtype``, or None when the operands don't fit this path
      (batch axes, several contracting axes, an asymmetric or unpacked-elsewhere operand, too
      many rows, no tiling); the caller then takes another path.
    """
    (lc, rc), (lb, rb) = dn
    if lb or rb or len(lc) != 1 or tile is None or lq.zero_point is not None:
        return None
    if get_qtype(lq.qtype).kind != "int" or lq.pack_axis is not None or lq.bits > 8:
        return None
    (la,), (ra,) = lc, rc
    if lq.scale.shape[la] != 1:
        return None
    layout = _weight_layout(rq, ra)
    if layout is None:
        return None
    k, g = layout
    bits = get_qtype(rq.qtype).storage_bits
    free_shape = tuple(n for a, n in enumerate(lq.shape) if a != la)
    rows = math.prod(free_shape)
    if rows > max_rows:
        return None
    K = lq.shape[la]
    if ra == 0 and g == K:  # a scale per output column: each tile is one "group"
        g = tile
    n_groups, gk = K // g, g // k  # groups along K; a group's length in one plane
    # lhs codes [R, K] -> planes [R, G, g/k] (element k i + j of K is plane j, element i);
    # scales [R, 1]. One row is padded to two.
    x = jnp.moveaxis(lq.qvalue, la, -1).reshape(rows, K)
    sx = jnp.moveaxis(lq.scale, la, -1).reshape(rows, 1).astype(jnp.float32)
    r_pad = max(rows, 2)
    if r_pad != rows:
        x = jnp.pad(x, ((0, r_pad - rows), (0, 0)))
    xp = x.reshape(r_pad, n_groups, gk, k)
    x_planes = [xp[..., j] for j in range(k)]  # [R', G, g/k] each
    n_tiles = rq.shape[0] // tile
    codes = rq.qvalue.reshape((n_tiles, rq.qvalue.shape[0] // n_tiles) + rq.qvalue.shape[1:])
    scale = rq.scale.astype(jnp.float32)
    if ra == 0:
        # Dense [K, N]: tiles of c rows of K hold c/g whole groups; partial sums over tiles.
        gt = tile // g
        n = rq.shape[1]
        scale = jnp.broadcast_to(scale, (n_groups, n)).reshape(n_tiles, gt, 1, n)
        xt = [p.reshape(r_pad, n_tiles, gt, gk).transpose(1, 0, 2, 3) for p in x_planes]

        def body(acc, step):
            c_i, s_i, *x_i = step
            ws = _planes(c_i.reshape(gt, gk, n), k, bits)  # [gt, g/k, N] each
            part = None
            for xj, wj in zip(x_i, ws, strict=True):
                pj = lax.dot_general(xj, wj, (((2,), (1,)), ((1,), (0,))),
                                     preferred_element_type=jnp.int32)  # [gt, R', N]
                part = pj if part is None else part + pj
            return acc + jnp.sum(part.astype(jnp.float32) * s_i, axis=0), None

        y, _ = lax.scan(body, varying_zeros((r_pad, n), codes, scale, *xt),
                        (codes, scale, *xt))
    else:
        # Head [V, K]: tiles of c rows of V; each gives its own columns of the output.
        scale = jnp.broadcast_to(scale, (rq.shape[0], n_groups)).reshape(n_tiles, tile, n_groups)

        def one(step):
            c_i, s_i = step
            ws = _planes(c_i.reshape(tile, n_groups, gk), k, bits)  # [c, G, g/k] each
            part = None
            for xj, wj in zip(x_planes, ws, strict=True):
                pj = lax.dot_general(xj, wj, (((2,), (2,)), ((1,), (1,))),
                                     preferred_element_type=jnp.int32)  # [G, R', c]
                part = pj if part is None else part + pj
            return jnp.sum(part.astype(jnp.float32) * s_i.T[:, None, :], axis=0)  # [R', c]

        ys = lax.map(one, (codes, scale))  # [n_tiles, R', c]
        y = jnp.moveaxis(ys, 0, 1).reshape(r_pad, rq.shape[0])
    y = y[:rows] * sx
    return y.reshape(free_shape + (y.shape[-1],)).astype(out_dtype)
