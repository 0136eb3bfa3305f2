"""Fake quantization for QAT: quantize then dequantize, with a straight-through gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.core import calibration
from jaxquant.core.qtypes import QKind
from jaxquant.core.spec import QuantSpec, resolve_layout

GRADIENTS = ("ste", "clipped_ste")


def fake_quant(
    x: jax.Array,
    spec: QuantSpec,
    *,
    key: jax.Array | None = None,
    gradient: str = "ste",
) -> jax.Array:
    """``dequantize(quantize(x))`` in ``x``'s dtype and shape, differentiable.

    The scale is calibrated from ``x`` and treated as a constant in the backward pass.

    Args:
      x: float tensor.
      spec: the :class:`QuantSpec`.
      key: PRNG key for stochastic rounding.
      gradient: ``"ste"``: the gradient is 1 everywhere (straight-through estimator).
        ``"clipped_ste"``: 1 inside the clipping range, 0 outside it (matters for
        ``percentile``/``mse`` calibration, which clip).

    Returns:
      Array like ``x``.

    Example:
      >>> y = fake_quant(jnp.linspace(-1, 1, 8), QuantSpec(qtype="int4"))
    """
    if gradient not in GRADIENTS:
        raise ValueError(f"Unknown gradient {gradient!r}; use one of {GRADIENTS}.")
    layout = resolve_layout(spec, x.shape)
    xs = jax.lax.stop_gradient(x)
    lo, hi = calibration.calibrate(xs, spec, layout)
    scale, zp = calibration.compute_scale(lo, hi, spec)
    q = calibration.quantize_codes(xs, scale, zp, spec, layout, key=key)
    xq = calibration.dequantize_codes(q, scale, zp, spec.qtype, layout, dtype=x.dtype)
    if gradient == "ste":
        # xq + (x - x): exactly xq forward (x + (xq - x) would round), gradient 1 backward.
        return jax.lax.stop_gradient(xq) + (x - xs)
    g = calibration.to_grouped(xs, layout)
    inside = (g >= calibration.expand_stat(lo, layout)) & (g <= calibration.expand_stat(hi, layout))
    mask = calibration.from_grouped(inside, layout).astype(x.dtype)
    return jax.lax.stop_gradient(xq) + (x - xs) * mask


def _round_ste(v: jax.Array) -> jax.Array:
    return v + jax.lax.stop_gradient(jnp.round(v) - v)


def lsq_init_scale(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """LSQ's initial step size ``2 mean|x| / sqrt(qmax)`` per scale entry (scale shape)."""
    layout = resolve_layout(spec, x.shape)
    xg = jnp.abs(calibration.to_grouped(x.astype(jnp.float32), layout))
    mean = calibration._reduce(jnp.mean, xg, layout)
    return jnp.maximum(2.0 * mean / jnp.sqrt(float(spec.qt.qmax)), 1e-8)


def lsq_fake_quant(x: jax.Array, scale: jax.Array, spec: QuantSpec) -> jax.Array:
    """Learned step size quantization (Esser et al. 2020) for symmetric int formats.

    ``y = round(clip(x / s, -qmax, qmax)) * s`` with a straight-through ``round``, so ``x``
    gets gradient 1 inside the range and 0 outside, and ``s`` gets LSQ's gradient, scaled by
    ``1 / sqrt(n * qmax)`` (``n`` elements per scale entry) for stable training. With
    ``spec.full_range`` the clip is ``[qmin, qmax]`` (every code, as :func:`quantize` uses it;
    ``s`` may then be negative, as a full-range RTN scale is). The forward uses ``s`` exactly,
    so ``y`` equals ``quantize(x, spec, scale=s).dequantize()`` bit for bit.

    Args:
      x: float tensor.
      scale: learnable step sizes of the layout's scale shape (init with :func:`lsq_init_scale`).
      spec: a symmetric int :class:`QuantSpec` (its calibration field is ignored).

    Returns:
      Array like ``x``.
    """
    qt = spec.qt
    if qt.kind is not QKind.INT or not spec.symmetric:
        raise ValueError(f"lsq_fake_quant needs a symmetric int spec, got {spec.qtype}, "
                         f"symmetric={spec.symmetric}.")
    layout = resolve_layout(spec, x.shape)
    if tuple(scale.shape) != layout.scale_shape:
        raise ValueError(f"scale has shape {tuple(scale.shape)}; expected {layout.scale_shape}.")
    n_per_scale = x.size // max(1, scale.size)
    g = 1.0 / jnp.sqrt(float(n_per_scale * qt.qmax))
    # Value exactly s (sg(a) - a is exactly 0), gradient scaled by g.
    s = jax.lax.stop_gradient(scale) + (scale * g - jax.lax.stop_gradient(scale * g))
    # In float32, as quantize_codes / dequantize_codes compute (whatever x's dtype).
    sg = calibration.expand_stat(s, layout).astype(jnp.float32)
    xg = calibration.to_grouped(x, layout).astype(jnp.float32)
    lo = qt.qmin if spec.full_range else -qt.qmax
    v = jnp.clip(xg / sg, lo, qt.qmax)
    # Sign codes (binary) have no 0: the forward is sign(v) (0 -> +1), the gradient v's.
    code = _round_ste(v) if qt.has_zero else v + jax.lax.stop_gradient(
        jnp.where(v >= 0, 1.0, -1.0) - v)
    return calibration.from_grouped(code * sg, layout).astype(x.dtype)
