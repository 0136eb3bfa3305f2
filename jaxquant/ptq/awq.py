"""AWQ (Lin et al. 2023): activation-aware per-input-channel scaling, then a clip search.

For linears that share an input ``x [n, d_in]`` (e.g. q/k/v after the attention norm):

1. **Scale search.** ``s = mean|x|^alpha`` (normalised so ``sqrt(max s * min s) = 1``), with
   ``alpha`` on a grid of 20 in ``[0, 1)``; pick the ``alpha`` whose quantized output
   ``f(Q(W * s) / s)`` is closest (MSE) to the float output ``f(W)``. ``f`` is the block
   output when the caller gives one, else the linears' outputs.
2. **Fold.** ``W <- W * s`` row-wise and the preceding RMSNorm scale (or linear's output
   columns) ``<- / s``: the float model is unchanged.
3. **Clip search.** Per output column and group, shrink the range by up to 50% to minimise the
   *output* error ``(x_g . (Q(w_g) - w_g))^2`` on sampled calibration tokens.
   (:func:`clip_ranges_hessian` is the same search in the ``H = X^T X`` norm, with no token
   sample: AWQ on any model, :mod:`jaxquant.ptq.any_model_scales`.)

As a model-level algorithm (:class:`AWQ`, recipe ``awq:int4:g128``) it searches a scale for
every site with a fold target (the site table's ``output``, e.g. the whole SwiGLU MLP, is the
search target), then clip-searches every linear but the ``bilinear`` ones (attention's q and k,
plain RTN).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxquant.core import calibration
from jaxquant.core.dot_general import operand_spec, quantize_operand
from jaxquant.core.qarray import QArray, quantize
from jaxquant.core.spec import QuantSpec, resolve_layout
from jaxquant.ptq.algorithm import PTQAlgorithm, Stat


def fake_quant_kernel(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """RTN quantize-dequantize of a kernel ``[d_in, d_out]`` as ``dot_general`` would."""
    return quantize_operand(w, spec, (0,), pack=False).dequantize()


def awq_scales(x_mean: jax.Array, alpha) -> jax.Array:
    """AWQ's candidate scale ``mean|x|^alpha``, normalised so ``sqrt(max s * min s) = 1`` and
    at least ``1e-4`` (``alpha = 0``: all ones). ``x_mean`` is ``[d_in]`` ``mean |x|``."""
    s = jnp.maximum(x_mean, 1e-8) ** alpha
    return jnp.maximum(s / jnp.sqrt(s.max() * s.min()), 1e-4)


def search_scale(
    x: jax.Array,
    kernels: Sequence[jax.Array],
    spec: QuantSpec,
    *,
    n_grid: int = 20,
    block_fn: Callable[[Sequence[jax.Array], jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, dict]:
    """Searches AWQ's per-input-channel scale for linears sharing the input ``x``.

    Args:
      x: calibration inputs ``[n, d_in]``.
      kernels: the linears' kernels, each ``[d_in, d_out_i]``.
      spec: the weight spec (operand spec, no axes).
      n_grid: number of ``alpha`` values in ``[0, 1)``.
      block_fn: ``block_fn(kernels, x) -> output`` of the block these linears feed; default
        concatenates ``x @ W_i``.

    Returns:
      ``(s [d_in], info)`` with the chosen ``alpha`` and its loss against ``alpha = 0``.
    """
    x = jnp.asarray(x, jnp.float32)
    kernels = [jnp.asarray(k, jnp.float32) for k in kernels]
    if block_fn is None:
        def block_fn(ks, xx):
            return jnp.concatenate([xx @ k for k in ks], axis=-1)
    ref = block_fn(kernels, x)
    x_mean = jnp.mean(jnp.abs(x), axis=0)
    alphas = [i / n_grid for i in range(n_grid)]

    @jax.jit
    def loss_for(alpha):
        s = awq_scales(x_mean, alpha)
        ks = [fake_quant_kernel(k * s[:, None], spec) / s[:, None] for k in kernels]
        return jnp.mean((block_fn(ks, x) - ref) ** 2), s

    losses, scales = [], []
    for a in alphas:
        loss, s = loss_for(jnp.float32(a))
        losses.append(float(loss))
        scales.append(s)
    best = min(range(len(alphas)), key=losses.__getitem__)
    return scales[best], {"alpha": alphas[best], "loss": losses[best], "loss_alpha0": losses[0]}


def clip_ratio_grid(n_grid: int, max_shrink: float) -> jax.Array:
    """AWQ's clip ratios ``1 - max_shrink * i / n_grid`` for ``i < n_grid``, ``[n_grid]``
    (the first is 1: no clip)."""
    return 1.0 - max_shrink * jnp.arange(n_grid, dtype=jnp.float32) / n_grid


def _clipped_dw(w, lo, hi, r, spec: QuantSpec, layout) -> jax.Array:
    """``Q(w) - w`` with the range ``(lo, hi)`` (``layout.scale_shape``) shrunk by ``r``."""
    scale, zp = calibration.compute_scale(lo * r, hi * r, spec)
    q = calibration.quantize_codes(w, scale, zp, spec, layout)
    return calibration.dequantize_codes(q, scale, zp, spec.qtype, layout) - w


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "max_shrink"))
def _clip_ratios(x, w, *, spec: QuantSpec, n_grid: int, max_shrink: float):
    full = operand_spec(spec, 2, (0,))
    layout = resolve_layout(full, w.shape)
    lo, hi = calibration.calibrate(w, full, layout)
    d_in, d_out = w.shape
    g = spec.group_size or d_in
    xg = x.reshape(x.shape[0], d_in // g, g)

    def err(r):
        dw = _clipped_dw(w, lo, hi, r, full, layout)
        y = jnp.einsum("tGk,Gko->tGo", xg, dw.reshape(d_in // g, g, d_out))
        return jnp.mean(y * y, axis=0)  # [G, d_out]

    ratios = clip_ratio_grid(n_grid, max_shrink)
    errs = jax.lax.map(err, ratios)
    best = ratios[jnp.argmin(errs, axis=0)]  # [G, d_out] == scale shape
    return lo * best, hi * best


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "max_shrink"))
def clip_ranges_hessian(
    w: jax.Array, h: jax.Array, *, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5
) -> tuple[jax.Array, jax.Array]:
    """AWQ's clip search in the ``H`` norm: per group and output column, the clip ratio (of
    :func:`clip_ratio_grid`) that minimises the layer's output error ``sum_o dW_o^T H dW_o``.

    The groups of a column are coupled through ``H``'s off-diagonal blocks, so they are visited
    in order (one Gauss-Seidel sweep from round to nearest): each group takes the ratio with the
    lowest *total* error given the others' current ratios. Ratio 1 (the current one at the
    start) is a candidate every time, so the error never exceeds round to nearest's.

    Args:
      w: the kernel ``[d_in, d_out]`` (float32).
      h: ``[d_in, d_in]`` Hessian of its inputs (``X^T X`` up to a factor).
      spec: the weight spec (operand spec, no axes; ``group_size`` in rows).
      n_grid, max_shrink: the ratios, as in :func:`clip_quantize`.

    Returns:
      ``(lo, hi)``: the clipped ranges, each of the scale shape of ``quantize_operand(w, spec,
      (0,))`` (``[d_in / group or 1, d_out]``); ``calibration.compute_scale(lo, hi, ...)`` is
      the scale to quantize ``w`` with.
    """
    full = operand_spec(spec, 2, (0,))
    layout = resolve_layout(full, w.shape)
    lo, hi = calibration.calibrate(w, full, layout)
    d_in, d_out = w.shape
    g = spec.group_size or d_in
    one = dataclasses.replace(full, channel_axes=(1,), group_size=None, group_axis=None)
    one_layout = resolve_layout(one, (g, d_out))  # one group's rows: scale [1, d_out]
    ratios = clip_ratio_grid(n_grid, max_shrink)
    hp = functools.partial(jnp.matmul, precision="highest")

    def group(j, carry):
        dw, best = carry
        wj = jax.lax.dynamic_slice_in_dim(w, j * g, g, 0)
        loj, hij = (jax.lax.dynamic_slice_in_dim(a, j, 1, 0) for a in (lo, hi))
        h_rows = jax.lax.dynamic_slice_in_dim(h, j * g, g, 0)  # [g, d_in]
        hjj = jax.lax.dynamic_slice_in_dim(h_rows, j * g, g, 1)  # [g, g]
        # The error's terms in group j's rows: dw_j^T H_jj dw_j + 2 dw_j^T (cross), where
        # cross = sum over the other groups k of H_jk dw_k.
        cross = hp(h_rows, dw) - hp(hjj, jax.lax.dynamic_slice_in_dim(dw, j * g, g, 0))

        def candidate(c, r):
            f_best, k_best, dw_best = c
            dwr = _clipped_dw(wj, loj, hij, r, one, one_layout)
            f = jnp.sum(dwr * (hp(hjj, dwr) + 2.0 * cross), axis=0)  # [d_out]
            better = f < f_best
            return (jnp.where(better, f, f_best), jnp.where(better, r, k_best),
                    jnp.where(better[None], dwr, dw_best)), None

        init = (jnp.full((d_out,), jnp.inf, jnp.float32), jnp.ones((d_out,), jnp.float32),
                jnp.zeros((g, d_out), jnp.float32))
        (_, r_best, dw_j), _ = jax.lax.scan(candidate, init, ratios)
        return (jax.lax.dynamic_update_slice_in_dim(dw, dw_j, j * g, 0),
                best.at[j].set(r_best))

    dw0 = _clipped_dw(w, lo, hi, 1.0, full, layout)  # round to nearest
    _, best = jax.lax.fori_loop(0, d_in // g, group, (dw0, jnp.ones_like(hi)))
    return lo * best, hi * best


def clip_quantize(
    x: jax.Array,
    w: jax.Array,
    spec: QuantSpec,
    *,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    max_tokens: int = 512,
) -> QArray:
    """AWQ's clip search, then quantization of ``w [d_in, d_out]`` with the clipped ranges.

    Args:
      x: calibration inputs ``[n, d_in]`` (the first ``max_tokens`` evenly spaced are used).
      w: the (already scaled) kernel.
      spec: the weight spec (operand spec, no axes).
      n_grid: number of clip ratios in ``(1 - max_shrink, 1]``.
      max_shrink: the largest fraction of the range removed (AWQ: 0.5).
      max_tokens: tokens used to measure the output error.

    Returns:
      The kernel as a :class:`QArray`, laid out as ``quantize_operand(w, spec, (0,))``.
    """
    x = jnp.asarray(x, jnp.float32)
    step = max(1, x.shape[0] // max_tokens)
    xs = x[::step][:max_tokens]
    lo, hi = _clip_ratios(xs, jnp.asarray(w, jnp.float32), spec=spec, n_grid=n_grid,
                          max_shrink=max_shrink)
    return quantize_with_ranges(jnp.asarray(w), spec, lo, hi)


def quantize_with_ranges(w: jax.Array, spec: QuantSpec, lo: jax.Array, hi: jax.Array) -> QArray:
    """``w [d_in, d_out]`` quantized as ``quantize_operand(w, spec, (0,))`` lays it out, with
    the scale (and zero point) of the ranges ``(lo, hi)`` (its scale shape) instead of the
    spec's calibration: a clip search's result."""
    full = operand_spec(spec, 2, (0,))
    scale, zp = calibration.compute_scale(lo, hi, full)
    return quantize(w, full, scale=scale, zero_point=zp)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQ(PTQAlgorithm):
    """AWQ: scale search and fold at every foldable site, then the clip search per linear."""

    int_only: ClassVar[bool] = True

    @property
    def fold_needs(self):
        return frozenset({Stat.SAMPLE, Stat.ABS_MEAN})

    @property
    def needs(self):
        return frozenset({Stat.SAMPLE})

    def site_scale(self, site, inputs, kernels, block):
        block_fn = None
        if site.output is not None:
            def block_fn(ks, xx):
                return site.output(ks, xx, block)
        s, _ = search_scale(inputs.sample(), kernels, self.weight_spec(site.d_in),
                            n_grid=self.options.awq_grid, block_fn=block_fn)
        return s

    def quantize_linear(self, kernel, spec, inputs, *, site, linear):
        if linear in site.bilinear:
            return quantize_operand(kernel, spec, (0,))
        return clip_quantize(inputs.sample(), kernel, spec)
