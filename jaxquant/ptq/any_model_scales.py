"""AWQ and SmoothQuant on any model ``jq.quantize_model`` handles: a searched input scale.

Both methods pick a per-input-channel scale ``s`` for each quantized layer and serve
``(x / s) . Q(W * s)``: the served layer keeps ``s`` as its ``input_scale`` and divides its input
by it (:mod:`jaxquant.nn.input_scale`; on jaxquant's own Transformer ``1 / s`` folds into the
norm before the layer instead: :mod:`jaxquant.ptq.awq`, :mod:`jaxquant.ptq.smoothquant`). In
float nothing changes; the quantization of ``W * s`` (and, with activation quantization, of
``x / s``) is what ``s`` improves.

Lingo: statistics and kernels are on the layer's matrix view (:mod:`jaxquant.ptq.kernel_view`:
``w2 [d_in, d_out]``, rows = contracted features; a conv's rows are ``(in, *window)``). ``s`` has
one entry per input channel (:func:`~jaxquant.ptq.kernel_view.channel_stat`: a conv's window taps
share their channel's entry) and is expanded to the rows by
:func:`~jaxquant.ptq.kernel_view.channel_rows`.

* :class:`AWQConfig` (``method="awq"``, ``"awq+gptq"``): ``s = mean|x|^alpha`` normalised
  (:func:`~jaxquant.ptq.awq.awq_scales`), ``alpha`` on a grid in ``[0, 1)``, the one whose
  quantized layer has the lowest output error ``sum_o dW_o^T H dW_o`` with ``H = X^T X`` and
  ``dW = Q(W * s) / s - W`` (no token sample needed; ``alpha = 0`` is RTN, so AWQ is never worse
  than RTN on the calibration data). ``W * s`` is then rounded to nearest, or GPTQ-solved on
  ``H' = diag(1/s) H diag(1/s)`` (the Hessian of the scaled inputs ``x / s``). With ``clip``
  (rounding only), AWQ's second step then shrinks each (group, output column)'s range of
  ``W * s`` by the ratio with the lowest output error in the same ``H'`` norm
  (:func:`~jaxquant.ptq.awq.clip_ranges_hessian`); the served kernel is ``W * s`` rounded with
  those clipped scales.
* :class:`SmoothQuantConfig` (``method="smoothquant"``): ``s_j = max|x_j|^alpha /
  max|W_j|^(1 - alpha)`` (:func:`~jaxquant.ptq.smoothquant.smooth_scales`), for layers whose
  rule quantizes activations (W8A8): the activation quantizer then sees the flattened ``x / s``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxquant.core.spec import QuantSpec
from jaxquant.nn.input_scale import input_scale_shape
from jaxquant.nn.layer_quant import LayerPlan
from jaxquant.ptq.awq import awq_scales, clip_ranges_hessian, fake_quant_kernel
from jaxquant.ptq.hessian import InputStats, abs_mean, hessian
from jaxquant.ptq.kernel_view import channel_rows, channel_stat, matrix_spec
from jaxquant.ptq.smoothquant import smooth_scales


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQConfig:
    """AWQ with a kept input scale (``method="awq"``; ``gptq=True`` is ``"awq+gptq"``).

    Attributes:
      n_grid: ``alpha`` runs over ``i / n_grid`` for ``i < n_grid`` (AWQ: 20). ``n_grid=1`` is
        ``alpha = 0`` only: ``s = 1``, plain RTN (or GPTQ).
      alpha: a fixed ``alpha`` in ``[0, 1]`` instead of the search (None: search).
      gptq: quantize ``W * s`` with GPTQ on ``diag(1/s) H diag(1/s)`` instead of rounding it.
      clip: AWQ's clip search after the scale: each (group, output column)'s range of ``W * s``
        shrinks by the ratio (``n_clip_grid`` in ``(0.5, 1]``) with the lowest output error in
        the ``H`` norm, and the layer is rounded with those scales (never a higher error on the
        calibration data than without). None (default): on when rounding (``gptq=False``),
        off with GPTQ, whose error feedback already solves for the rounding on the grid of the
        (unclipped) range; ``True`` with ``gptq=True`` is refused.
      n_clip_grid: the number of clip ratios tried, ``1 - 0.5 * i / n_clip_grid`` (AWQ: 20;
        1 is no clip).
    """

    n_grid: int = 20
    alpha: float | None = None
    gptq: bool = False
    clip: bool | None = None
    n_clip_grid: int = 20

    def __post_init__(self):
        if not isinstance(self.n_grid, int) or isinstance(self.n_grid, bool) or self.n_grid < 1:
            raise ValueError(f"AWQConfig.n_grid must be a positive int, got {self.n_grid!r}.")
        if self.alpha is not None and (not isinstance(self.alpha, (int, float))
                                       or not 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"AWQConfig.alpha must be None or in [0, 1], got {self.alpha!r}.")
        if not isinstance(self.gptq, bool):
            raise ValueError(f"AWQConfig.gptq must be a bool, got {self.gptq!r}.")
        if self.clip is not None and not isinstance(self.clip, bool):
            raise ValueError(f"AWQConfig.clip must be None or a bool, got {self.clip!r}.")
        if self.clip and self.gptq:
            raise ValueError("AWQConfig(clip=True, gptq=True): the clip search picks scales for "
                             "rounding to nearest; GPTQ calibrates its own. Use clip=None.")
        if (not isinstance(self.n_clip_grid, int) or isinstance(self.n_clip_grid, bool)
                or self.n_clip_grid < 1):
            raise ValueError(
                f"AWQConfig.n_clip_grid must be a positive int, got {self.n_clip_grid!r}.")

    @property
    def name(self) -> str:
        return "awq+gptq" if self.gptq else "awq"

    def check(self, plan: LayerPlan) -> None:
        """AWQ applies to any dot / einsum / conv layer with quantized weights."""
        del plan

    def scale(self, plan: LayerPlan, w2: jax.Array, stats: InputStats) -> tuple[jax.Array, dict]:
        """``(s, info)``: the layer's input scale (``input_scale_shape(plan)``) and ``info``
        with the chosen ``alpha``, its output error ``loss`` and ``loss_rtn`` (``alpha = 0``)."""
        stats = _one_group(plan, stats, self.name)
        mean = channel_stat(plan, abs_mean(stats), "mean")
        alphas = jnp.arange(self.n_grid, dtype=jnp.float32) / self.n_grid
        if self.alpha is not None:
            alphas = jnp.asarray([0.0, self.alpha], jnp.float32)  # 0: the RTN reference
        rows = channel_rows(plan, jnp.arange(mean.shape[0]))  # each row's channel
        losses = _awq_losses(matrix_spec(plan), w2, hessian(stats), mean, alphas, rows)
        best = int(jnp.argmin(losses)) if self.alpha is None else 1
        s = awq_scales(mean, alphas[best]).reshape(input_scale_shape(plan))
        info = {"alpha": float(alphas[best]), "loss": float(losses[best]),
                "loss_rtn": float(losses[0])}
        return s, info

    @property
    def clips(self) -> bool:
        """Whether the clip search runs (``clip``, or its default: on without GPTQ)."""
        return (not self.gptq) if self.clip is None else self.clip

    def weight_ranges(
        self, plan: LayerPlan, w2s: jax.Array, stats: InputStats, s: jax.Array
    ) -> tuple[jax.Array, jax.Array] | None:
        """The clipped ranges ``(lo, hi)`` (``[d_in / group or 1, d_out]`` each) to round the
        scaled matrix ``w2s = W * s`` ``[d_in, d_out]`` with, searched in the norm of the
        scaled inputs' Hessian ``diag(1/s) H diag(1/s)``; None without the clip search."""
        if not self.clips:
            return None
        r = channel_rows(plan, jnp.asarray(s, jnp.float32))
        h = hessian(_one_group(plan, stats, self.name)) / (r[:, None] * r[None, :])
        return clip_ranges_hessian(w2s, h, spec=matrix_spec(plan), n_grid=self.n_clip_grid)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig:
    """SmoothQuant with a kept input scale (``method="smoothquant"``), for W8A8-style rules.

    Attributes:
      alpha: migration strength in ``[0, 1]`` (the paper's 0.5): ``s_j = max|x_j|^alpha /
        max|W_j|^(1 - alpha)``.
    """

    alpha: float = 0.5

    def __post_init__(self):
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SmoothQuantConfig.alpha must be in [0, 1], got {self.alpha!r}.")

    name = "smoothquant"

    def check(self, plan: LayerPlan) -> None:
        """Raises unless the layer's rule quantizes its activations (else ``s`` buys nothing)."""
        if plan.config.lhs is None:
            raise ValueError(
                f"{plan.path}: method='smoothquant' moves activation outliers into the weights "
                "for activation quantization, but this layer's rule keeps activations float; "
                "use a rule that quantizes them (jq.w8a8()) or method='awq' / 'rtn'."
            )

    def scale(self, plan: LayerPlan, w2: jax.Array, stats: InputStats) -> tuple[jax.Array, dict]:
        """``(s, info)``: the layer's input scale (``input_scale_shape(plan)``), ``info`` with
        ``alpha``."""
        stats = _one_group(plan, stats, self.name)
        x_max = channel_stat(plan, stats.abs_max, "max")
        w_max = channel_stat(plan, jnp.max(jnp.abs(w2), axis=1), "max")
        s = smooth_scales(x_max, [w_max[:, None]], self.alpha)
        return s.reshape(input_scale_shape(plan)), {"alpha": self.alpha}

    def weight_ranges(self, plan, w2s, stats, s) -> None:
        """None: SmoothQuant rounds ``W * s`` with the spec's own calibration."""
        del plan, w2s, stats, s


# The methods calibrate_and_convert names by string, besides "rtn" and "gptq".
SCALED_METHODS = {
    "awq": AWQConfig(),
    "awq+gptq": AWQConfig(gptq=True),
    "smoothquant": SmoothQuantConfig(),
}
ScaleConfig = AWQConfig | SmoothQuantConfig


def _one_group(plan: LayerPlan, stats: InputStats, method: str) -> InputStats:
    if int(stats.count.shape[0]) != 1:
        raise ValueError(
            f"{plan.path}: method={method!r} needs one scale per input channel, but this "
            f"{plan.layer} has {int(stats.count.shape[0])} feature groups (a grouped conv), "
            "whose channels feed separate blocks. Use method='gptq' or 'rtn', or keep it "
            f"float with QuantRule(r'^{plan.path}$', None) first in the rules."
        )
    return jax.tree.map(lambda a: a[0], stats)


@functools.partial(jax.jit, static_argnums=0)
def _awq_losses(spec: QuantSpec, w2, h, mean, alphas, rows) -> jax.Array:
    """AWQ's output error ``tr(dW^T H dW)`` for each ``alpha``, ``[n_grid]`` (``rows``: the
    channel of each row of ``w2``; one compiled program per shape and spec)."""

    def loss(alpha):
        r = awq_scales(mean, alpha)[rows][:, None]
        dw = fake_quant_kernel(w2 * r, spec) / r - w2
        return jnp.sum(dw * jnp.matmul(h, dw, precision="highest"))

    return jax.lax.map(loss, alphas)


__all__ = ["SCALED_METHODS", "AWQConfig", "ScaleConfig", "SmoothQuantConfig"]
