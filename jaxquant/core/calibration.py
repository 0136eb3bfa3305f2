"""Calibration in three small steps: range -> scale and zero point -> codes.

1. :func:`calibrate` finds a range ``(lo, hi)`` per scale entry (per channel / group),
2. :func:`compute_scale` turns the range into ``scale`` and ``zero_point``,
3. :func:`quantize_codes` rounds a tensor onto the grid those define.

GPTQ, static activation scales and AWQ's clip search reuse these pieces.

All statistics have the *scale shape* of :class:`~jaxquant.core.spec.Layout`: the tensor's
rank, full size on channel axes, ``n // group_size`` on the grouped axis, 1 elsewhere.
Internally the grouped axis ``a`` of size ``n`` is viewed as ``(n // g, g)`` ("grouped view").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxquant.core.qtypes import QKind, get_qtype
from jaxquant.core.spec import Layout, QuantSpec


# --- grouped view -------------------------------------------------------------------------------
def to_grouped(x: jax.Array, layout: Layout) -> jax.Array:
    """``[..., n, ...] -> [..., n // g, g, ...]`` on the grouped axis (identity if none)."""
    a = layout.group_axis
    if a is None:
        return x
    g = layout.group_size
    return x.reshape(x.shape[:a] + (x.shape[a] // g, g) + x.shape[a + 1 :])


def from_grouped(x: jax.Array, layout: Layout) -> jax.Array:
    """Inverse of :func:`to_grouped`."""
    a = layout.group_axis
    if a is None:
        return x
    return x.reshape(x.shape[:a] + (x.shape[a] * x.shape[a + 1],) + x.shape[a + 2 :])


def expand_stat(s: jax.Array, layout: Layout) -> jax.Array:
    """Scale-shaped ``s`` -> broadcastable against the grouped view."""
    if s is None or layout.group_axis is None:
        return s
    return jnp.expand_dims(s, layout.group_axis + 1)


def _reduce_axes(layout: Layout) -> tuple[int, ...]:
    """Axes of the grouped view that a scale entry reduces over."""
    a = layout.group_axis
    axes = []
    for ax in range(len(layout.shape)):
        if ax in layout.channel_axes:
            continue
        # At and after the grouped axis, the grouped view has one more axis: the group axis
        # itself becomes (group index, inside group) and only "inside group" is reduced.
        axes.append(ax if a is None or ax < a else ax + 1)
    return tuple(axes)


def _reduce(fn, xg: jax.Array, layout: Layout) -> jax.Array:
    r = fn(xg, axis=_reduce_axes(layout), keepdims=True)
    if layout.group_axis is not None:
        r = jnp.squeeze(r, layout.group_axis + 1)
    return r


# --- step 1: range ------------------------------------------------------------------------------
def calibrate(x: jax.Array, spec: QuantSpec, layout: Layout) -> tuple[jax.Array, jax.Array]:
    """Range of ``x`` per scale entry.

    Args:
      x: the tensor, shape ``layout.shape``.
      spec: the spec (``calibration`` picks the method).
      layout: ``resolve_layout(spec, x.shape)``.

    Returns:
      ``(lo, hi)``, each of ``layout.scale_shape``, float32. Symmetric specs give ``lo = -hi``
      (except ``full_range`` ones, which keep the signed min and max); ``absmean`` gives
      ``hi = mean |x|``.
    """
    xg = to_grouped(x.astype(jnp.float32), layout)
    method = spec.calibration
    if method == "absmean":  # symmetric only (QuantSpec checks)
        hi = _reduce(jnp.mean, jnp.abs(xg), layout)
        return -hi, hi
    if method == "percentile":
        p = float(spec.percentile)
        axes = _reduce_axes(layout)

        def pct(v, q):
            r = jnp.percentile(v, q, axis=axes, keepdims=True)
            return r if layout.group_axis is None else jnp.squeeze(r, layout.group_axis + 1)

        if spec.symmetric and not spec.full_range:
            hi = pct(jnp.abs(xg), p)
            return -hi, hi
        return pct(xg, 100.0 - p), pct(xg, p)
    lo = _reduce(jnp.min, xg, layout)
    hi = _reduce(jnp.max, xg, layout)
    if spec.symmetric and not spec.full_range:
        hi = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        lo = -hi
    if method == "mse":
        lo, hi = _mse_search(xg, lo, hi, spec, layout)
    return lo, hi


def _mse_search(xg, lo, hi, spec: QuantSpec, layout: Layout):
    """Shrinks ``(lo, hi)`` by the ratio in ``[mse_min_ratio, 1]`` minimising the squared error."""
    ratios = jnp.linspace(1.0, spec.mse_min_ratio, spec.mse_grid)
    # The search compares ranges by their round-to-nearest error, so it needs no PRNG key even
    # when the spec itself rounds stochastically.
    search_spec = dataclasses.replace(spec, rounding="nearest")

    def err_for(r):
        lo_r, hi_r = lo * r, hi * r
        scale, zp = compute_scale(lo_r, hi_r, search_spec)
        q = quantize_codes(xg, scale, zp, search_spec, layout, grouped=True)
        xh = dequantize_codes(q, scale, zp, spec.qtype, layout, grouped=True)
        return _reduce(jnp.sum, (xh - xg) ** 2, layout)

    errs = jax.lax.map(err_for, ratios)  # [grid, *scale_shape]; one candidate in memory at a time
    best = ratios[jnp.argmin(errs, axis=0)]
    return lo * best, hi * best


# --- step 2: scale and zero point ---------------------------------------------------------------
def compute_scale(
    lo: jax.Array, hi: jax.Array, spec: QuantSpec
) -> tuple[jax.Array, jax.Array | None]:
    """Scale and zero point from a range.

    Symmetric: ``scale = max(|lo|, |hi|) / max_value``. Asymmetric (int):
    ``scale = (hi - lo) / (qmax - qmin)`` and ``zero_point = qmin - lo / scale`` (a float, so
    ``lo`` and ``hi`` are both exactly on the grid, as in GGUF's Q4_1).

    An all-zero range gives ``scale = 1`` so that codes and the dequantized values are 0, not NaN;
    a constant asymmetric range ``lo == hi == c`` gives ``scale = |c|`` so that c is exact.
    A scale too small for ``spec.scale_dtype`` (float16: below 6.1e-5, e.g. weights of
    magnitude 1e-9) is clamped to that dtype's smallest normal value instead of underflowing to
    0 (which gave NaN): the step is then that value, so such tiny values quantize to 0.
    Formats without a zero code (``binary``) keep ``scale = 0`` for an all-zero range instead:
    their codes are never 0, so only a zero scale dequantizes that group to zeros.

    Returns:
      ``(scale, zero_point)``; ``zero_point`` is None when symmetric.
    """
    qt = spec.qt
    dtype = jnp.dtype(spec.scale_dtype)
    if spec.symmetric and spec.full_range:
        # llama.cpp's Q4_0: the signed extreme maps to qmin (ties go to hi).
        extreme = jnp.where(jnp.abs(lo) > jnp.abs(hi), lo, hi)
        scale = _fp16_round(extreme / qt.qmin, spec)
        scale = _clamp_tiny(jnp.where((scale > 0) | (scale < 0), scale, 1.0), dtype)
        return scale.astype(dtype), None
    if spec.symmetric:
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        scale = _fp16_round(amax / qt.max_value, spec)
        if not qt.has_zero:
            return jnp.where(scale > 0, _clamp_tiny(scale, dtype), 0.0).astype(dtype), None
        scale = _clamp_tiny(jnp.where(scale > 0, scale, 1.0), dtype)
        return scale.astype(dtype), None
    span = hi - lo
    scale = span / (qt.qmax - qt.qmin)
    # A constant group (lo == hi == c) takes scale |c|: c / scale = +-1 and the zero point are
    # then small integers, so c comes back exactly instead of losing bits in a float zero point.
    mag = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    scale = jnp.where(scale > 0, scale, jnp.where(mag > 0, mag, 1.0))
    if spec.fp16_scales:  # llama.cpp's Q4_1: f16 d and f16 m = lo, the codes chosen after
        scale = _fp16_round(scale, spec)
        scale = jnp.where(scale > 0, scale, 1.0)
        lo = _fp16_round(lo, spec)
    scale = _clamp_tiny(scale, dtype).astype(dtype)
    zero_point = (qt.qmin - lo / scale.astype(jnp.float32)).astype(dtype)
    return scale, zero_point


def _clamp_tiny(scale: jax.Array, dtype) -> jax.Array:
    """``scale`` with magnitudes below ``dtype``'s smallest normal raised to it (sign kept)."""
    tiny = float(jnp.finfo(dtype).tiny)
    return jnp.where(jnp.abs(scale) < tiny, jnp.where(scale < 0, -tiny, tiny), scale)


def _fp16_round(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """``x`` rounded to the nearest float16 value when ``spec.fp16_scales`` (else ``x``)."""
    if not spec.fp16_scales:
        return x
    return x.astype(jnp.float16).astype(jnp.float32)


# --- step 3: codes ------------------------------------------------------------------------------
def round_values(v: jax.Array, rounding: str, key: jax.Array | None) -> jax.Array:
    """Rounds to the nearest integer, or stochastically (``floor(v + u)``, ``u ~ U[0, 1)``)."""
    if rounding == "nearest":
        return jnp.round(v)
    if key is None:
        raise ValueError("rounding='stochastic' needs a PRNG key: pass key=jax.random.key(...).")
    return jnp.floor(v + jax.random.uniform(key, v.shape, jnp.float32))


def quantize_codes(
    x: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array | None,
    spec: QuantSpec,
    layout: Layout,
    *,
    key: jax.Array | None = None,
    grouped: bool = False,
) -> jax.Array:
    """Codes of ``x`` on the grid of ``(scale, zero_point)``, unpacked.

    Args:
      x: shape ``layout.shape`` (or its grouped view if ``grouped``).
      scale, zero_point: ``layout.scale_shape``.
      spec: the spec (format and rounding).
      layout: the resolved layout.
      key: PRNG key for stochastic rounding.
      grouped: whether ``x`` is already in grouped view (the result then is too).

    Returns:
      int8 codes (ints: clipped to the format's range; ``binary``: the sign, ``+1`` for 0;
      codebooks: indices 0..15), or float8 values for fp8, in the shape of ``x``.
    """
    qt = spec.qt
    xg = x if grouped else to_grouped(x, layout)
    s = expand_stat(scale, layout).astype(jnp.float32)
    if not qt.has_zero:  # sign codes {-1, +1}; a zero scale (all-zero group) is allowed
        q = _sign_codes(xg.astype(jnp.float32), s, spec.rounding, key)
        return q if grouped else from_grouped(q, layout)
    v = xg.astype(jnp.float32) / s
    if qt.kind is QKind.INT:
        if zero_point is not None:
            v = v + expand_stat(zero_point, layout).astype(jnp.float32)
            lo, hi = qt.qmin, qt.qmax
        else:
            lo, hi = (qt.qmin if spec.full_range else -qt.qmax), qt.qmax
        q = jnp.clip(round_values(v, spec.rounding, key), lo, hi).astype(jnp.int8)
    elif qt.kind is QKind.FLOAT:
        q = jnp.clip(v, -qt.max_value, qt.max_value).astype(qt.storage_dtype)
    else:
        cb = jnp.asarray(qt.codebook)
        mids = (cb[1:] + cb[:-1]) / 2
        q = jnp.searchsorted(mids, jnp.clip(v, -1.0, 1.0), side="left").astype(jnp.int8)
    return q if grouped else from_grouped(q, layout)


def _sign_codes(x: jax.Array, s: jax.Array, rounding: str, key) -> jax.Array:
    """Sign codes of ``x / s``: nearest is ``sign(x / s)`` with 0 -> +1 (``s = 0`` counts as
    positive); stochastic picks +1 with probability ``(clip(x / s, -1, 1) + 1) / 2``, which is
    unbiased inside the range."""
    if rounding == "nearest":
        return jnp.where(jnp.where(s < 0, -x, x) >= 0, 1, -1).astype(jnp.int8)
    v = jnp.clip(jnp.where(s != 0, x / jnp.where(s != 0, s, 1.0), 0.0), -1.0, 1.0)
    return (2 * round_values((v + 1) / 2, rounding, key) - 1).astype(jnp.int8)


def dequantize_codes(
    q: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array | None,
    qtype: str,
    layout: Layout,
    *,
    dtype=jnp.float32,
    grouped: bool = False,
) -> jax.Array:
    """``(q - zero_point) * scale`` (ints), ``q * scale`` (fp8), ``codebook[q] * scale``."""
    qt = get_qtype(qtype)
    qg = q if grouped else to_grouped(q, layout)
    s = expand_stat(scale, layout).astype(jnp.float32)
    if qt.kind is QKind.CODEBOOK:
        v = jnp.asarray(qt.codebook)[qg.astype(jnp.int32)]
    else:
        v = qg.astype(jnp.float32)
    if zero_point is not None:
        v = v - expand_stat(zero_point, layout).astype(jnp.float32)
    out = (v * s).astype(dtype)
    return out if grouped else from_grouped(out, layout)
