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


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "max_shrink"))
def _clip_ratios(x, w, *, spec: QuantSpec, n_grid: int, max_shrink: float):
    full = operand_spec(spec, 2, (0,))
    layout = resolve_layout(full, w.shape)
    lo, hi = calibration.calibrate(w, full, layout)
    d_in, d_out = w.shape
    g = spec.group_size or d_in
    xg = x.reshape(x.shape[0], d_in // g, g)

    def err(r):
        scale, zp = calibration.compute_scale(lo * r, hi * r, full)
        q = calibration.quantize_codes(w, scale, zp, full, layout)
        dw = calibration.dequantize_codes(q, scale, zp, full.qtype, layout) - w
        y = jnp.einsum("tGk,Gko->tGo", xg, dw.reshape(d_in // g, g, d_out))
        return jnp.mean(y * y, axis=0)  # [G, d_out]

    ratios = 1.0 - max_shrink * jnp.arange(n_grid) / n_grid
    errs = jax.lax.map(err, ratios)
    best = ratios[jnp.argmin(errs, axis=0)]  # [G, d_out] == scale shape
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
    full = operand_spec(spec, 2, (0,))
    scale, zp = calibration.compute_scale(lo, hi, full)
    return quantize(jnp.asarray(w), full, scale=scale, zero_point=zp)


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
