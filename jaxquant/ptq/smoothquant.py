"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights before W8A8.

For linears sharing an input ``x [.., d_in]`` behind an RMSNorm with scale ``g [d_in]``::

    s_j = max|x_j|^alpha / max_i |W_ji|^(1 - alpha)
    g <- g / s,   W <- diag(s) W

``x @ W`` is unchanged in float (folding is exact up to rounding), while the
activation's per-channel range is flattened so per-token int8 loses less. The folding
itself is in :mod:`jaxquant.ptq.folding`.

:func:`search_alpha` picks ``alpha`` per input site from a grid, by the W8A8 output error on
calibration tokens (the grid contains the paper's 0.5, so on those tokens it is never worse).

As a model-level algorithm (:class:`SmoothQuant`, recipe ``smoothquant``) it smooths the sites
named in ``PTQOptions.smooth_sites`` and then rounds the int8 weights to nearest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxquant.core.dot_config import DotGeneralConfig, w8a8
from jaxquant.core.dot_general import quantize_operand
from jaxquant.ptq.algorithm import Stat
from jaxquant.ptq.rtn import RTN

ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(2, 10))  # 0.2 .. 0.9


def smooth_scales(
    act_absmax: jax.Array, kernels: Sequence[jax.Array], alpha: float = 0.5
) -> jax.Array:
    """SmoothQuant's per-input-channel scales.

    Args:
      act_absmax: ``[d_in]`` calibrated ``max |x|`` per input channel.
      kernels: kernels ``[d_in, d_out_i]`` that share the input.
      alpha: migration strength in ``[0, 1]`` (0.5 in the paper).

    Returns:
      ``s [d_in]``, positive.
    """
    if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    w_max = jnp.max(jnp.stack([jnp.max(jnp.abs(k), axis=1) for k in kernels]), axis=0)
    a = jnp.maximum(act_absmax.astype(jnp.float32), 1e-5)
    w = jnp.maximum(w_max.astype(jnp.float32), 1e-5)
    return jnp.clip(a**alpha / w ** (1.0 - alpha), 1e-5, 1e5)


def w8a8_output(x: jax.Array, kernel: jax.Array, config: DotGeneralConfig) -> jax.Array:
    """``x [n, d_in] @ kernel [d_in, d_out]`` with both operands quantized as ``config``'s
    ``dot_general`` would (per-token activations, per-channel weights), in float."""
    xq = quantize_operand(x, config.lhs, (1,), pack=False).dequantize()
    wq = quantize_operand(kernel, config.rhs, (0,), pack=False).dequantize()
    return jnp.matmul(xq, wq, precision="highest")


@jax.jit
def _w8a8_error(x, kernels, refs, s):
    """Summed output MSE of the smoothed W8A8 linears against their float outputs ``refs``."""
    cfg = w8a8()
    return sum(jnp.mean((w8a8_output(x / s, k * s[:, None], cfg) - ref) ** 2)
               for k, ref in zip(kernels, refs, strict=True))


def search_alpha(
    x: jax.Array,
    kernels: Sequence[jax.Array],
    act_absmax: jax.Array,
    alphas: Sequence[float] = ALPHA_GRID,
) -> tuple[jax.Array, dict]:
    """Picks SmoothQuant's ``alpha`` for linears sharing the input ``x``.

    Args:
      x: calibration inputs ``[n, d_in]``.
      kernels: kernels ``[d_in, d_out_i]`` fed by ``x``.
      act_absmax: ``[d_in]`` ``max |x|`` over all calibration tokens.
      alphas: the grid.

    Returns:
      ``(s [d_in], info)``: the scales of the best ``alpha`` and ``info`` with ``alpha``,
      its W8A8 output MSE and the MSE without smoothing.
    """
    x = jnp.asarray(x, jnp.float32)
    kernels = [jnp.asarray(k, jnp.float32) for k in kernels]
    refs = [jnp.matmul(x, k, precision="highest") for k in kernels]
    scales = [smooth_scales(act_absmax, kernels, a) for a in alphas]
    losses = [float(_w8a8_error(x, kernels, refs, s)) for s in scales]
    best = min(range(len(alphas)), key=losses.__getitem__)
    base = float(_w8a8_error(x, kernels, refs, jnp.ones_like(scales[0])))
    info = {"alpha": alphas[best], "loss": losses[best], "loss_unsmoothed": base}
    return scales[best], info


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmoothQuant(RTN):
    """Smooth the inputs of ``options.smooth_sites`` (``alpha`` searched or the recipe's), then
    RTN int8 weights served with int8 activations."""

    activations: ClassVar[bool] = True

    def check(self, sites):
        foldable = [s.name for s in sites if s.fold_into is not None]
        if bad := [s for s in self.options.smooth_sites if s not in foldable]:
            raise ValueError(f"smooth_sites {bad} are not input sites with a fold target in "
                             f"this model; use some of {foldable}.")

    @property
    def fold_needs(self):
        return frozenset({Stat.ABS_MAX, Stat.SAMPLE} if self.options.smooth_search
                         else {Stat.ABS_MAX})

    def site_scale(self, site, inputs, kernels, block):
        del block
        if site.name not in self.options.smooth_sites:
            return None
        # The captured input is the norm's output, so its max already includes the norm scale.
        if self.options.smooth_search:
            s, _ = search_alpha(inputs.sample(), kernels, inputs.abs_max())
            return s
        return smooth_scales(inputs.abs_max(), kernels, self.recipe.alpha)
