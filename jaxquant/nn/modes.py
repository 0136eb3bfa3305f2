"""Quantization modes, activation statistics, and the calibrate_model / convert drivers.

A model built from :class:`~jaxquant.nn.QDense` (and friends) runs in one of four modes:

* ``TRAIN``: float kernels, quantized on the fly by :func:`jaxquant.core.dot_general.dot_general`
  with the layer's config (QAT; the forward is the integer product, the backward as the config
  says).
* ``CALIBRATE``: a float forward that also accumulates activation statistics of each layer's
  input in the ``quant_stats`` collection (apply with ``mutable=["quant_stats"]``).
* ``CONVERT``: reads the float kernels and writes the serving params into the (mutable)
  ``params`` collection: each quantized kernel becomes a :class:`~jaxquant.core.QArray` made
  by ``quantize_operand`` (no float copy kept), plus a static activation scale where the layer
  asks for one. :func:`convert` does this; by hand it is
  ``_, v = model.clone(mode=CONVERT).apply({"params": p, "quant_stats": s}, x, mutable=["params"])``
  and ``v["params"]`` are the serving params.
* ``SERVE``: runs from those params only.

The statistics follow optax's style: :func:`act_stats_init` / :func:`act_stats_update` are pure
functions on the :class:`ActStats` NamedTuple.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.core import compute_scale
from jaxquant.core.dot_config import DotGeneralConfig
from jaxquant.core.spec import QuantSpec

STATS_COLLECTION = "quant_stats"
# The param of a layer with ``learned_scale`` (LSQ QAT) beside its float kernel: the weight
# scale, in the layout of ``quantize_operand(kernel, ...).scale``. Training state only: CONVERT
# folds it into the kernel's QArray and :func:`convert` drops it from the serving params.
LEARNED_SCALE = "kernel_scale"


class StaticActivation(str, enum.Enum):
    """How a static (per-tensor, calibrated) activation scale is taken from :class:`ActStats`.

    * ``ABSMAX``: the running min / max.
    * ``PERCENTILE``: the running mean of each batch's percentiles (ignores rare outliers).

    A ``str`` enum: ``StaticActivation.ABSMAX == "absmax"``; fields accept either spelling.
    """

    ABSMAX = "absmax"
    PERCENTILE = "percentile"

    def __str__(self) -> str:
        return self.value


def static_activation_method(
    method: str | StaticActivation | None,
    config: DotGeneralConfig | None = None,
    *,
    check_config: bool = True,
) -> StaticActivation | None:
    """Validates a ``static_activation`` setting (of a rule or a layer) against its config.

    Args:
      method: None (dynamic activation scales), a :class:`StaticActivation` or its value.
      config: the layer's config; with ``check_config`` it must quantize the activations
        (``config.lhs``) without groups.
      check_config: False checks only the method.

    Returns:
      The :class:`StaticActivation`, or None.

    Raises:
      ValueError: for an unknown method, or a config without a per-tensor lhs spec.
    """
    if method is None:
        return None
    try:
        method = StaticActivation(method)
    except ValueError:
        raise ValueError(
            f"static_activation must be None or one of {[m.value for m in StaticActivation]}, "
            f"got {method!r}."
        ) from None
    if check_config:
        if config is None or config.lhs is None:
            raise ValueError(
                "static_activation needs a config that quantizes the activations (lhs), "
                "e.g. w8a8(); weight-only configs have no activation scale."
            )
        if config.lhs.group_size is not None:
            raise ValueError(
                "static_activation uses one per-tensor scale; drop group_size from the lhs spec."
            )
    return method


class QuantMode(enum.Enum):
    """What a quantized layer does with its kernel; see the module docstring."""

    TRAIN = "train"
    CALIBRATE = "calibrate"
    CONVERT = "convert"
    SERVE = "serve"


# --- activation statistics ----------------------------------------------------------------------


class ActStats(NamedTuple):
    """Running statistics of a layer's input activations.

    Attributes:
      count: number of batches seen, int32 ``[]``.
      min, max: running extremes over every element, ``[]``.
      pct_lo, pct_hi: running mean of each batch's ``100 - p`` and ``p`` percentile of ``x``
        (a robust range estimate that ignores rare outliers), ``[]``.
      channel_absmax: running ``max |x|`` per contracting (input) channel, ``[*in_shape]``; what
        SmoothQuant and AWQ need.
    """

    count: jax.Array
    min: jax.Array
    max: jax.Array
    pct_lo: jax.Array
    pct_hi: jax.Array
    channel_absmax: jax.Array


def act_stats_init(channel_shape: tuple[int, ...] = ()) -> ActStats:
    """Empty statistics for inputs whose contracting axes have shape ``channel_shape``."""
    z = jnp.zeros((), jnp.float32)
    return ActStats(
        count=jnp.zeros((), jnp.int32),
        min=jnp.full((), jnp.inf, jnp.float32),
        max=jnp.full((), -jnp.inf, jnp.float32),
        pct_lo=z,
        pct_hi=z,
        channel_absmax=jnp.zeros(tuple(channel_shape), jnp.float32),
    )


def act_stats_update(
    state: ActStats, x: jax.Array, *, n_channel_axes: int = 1, percentile: float | None = 99.99
) -> ActStats:
    """Adds one batch ``x`` (``[..., *channel_shape]``) to ``state``.

    Args:
      state: the running statistics.
      x: activations whose last ``n_channel_axes`` axes are the contracting (input) channels.
      n_channel_axes: how many trailing axes ``channel_absmax`` keeps.
      percentile: ``p`` for the running percentile estimate, or None to skip it (it sorts ``x``).

    Returns:
      The updated :class:`ActStats`.

    Example:
      >>> s = act_stats_update(act_stats_init((4,)), jnp.ones((2, 3, 4)))
      >>> float(s.max), s.channel_absmax.shape
      (1.0, (4,))
    """
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    count = state.count + 1
    lead = tuple(range(x.ndim - n_channel_axes))
    chan = jnp.max(jnp.abs(x), axis=lead) if lead else jnp.abs(x)
    if percentile is None:
        pct_lo, pct_hi = state.pct_lo, state.pct_hi
    else:
        lo, hi = jnp.percentile(x, jnp.array([100.0 - percentile, percentile]))
        w = 1.0 / count.astype(jnp.float32)
        pct_lo = state.pct_lo + (lo - state.pct_lo) * w
        pct_hi = state.pct_hi + (hi - state.pct_hi) * w
    return ActStats(
        count=count,
        min=jnp.minimum(state.min, jnp.min(x)),
        max=jnp.maximum(state.max, jnp.max(x)),
        pct_lo=pct_lo,
        pct_hi=pct_hi,
        channel_absmax=jnp.maximum(state.channel_absmax, chan),
    )


def static_scale(
    stats: ActStats, spec: QuantSpec, method: str | StaticActivation = StaticActivation.ABSMAX
) -> tuple[jax.Array, jax.Array | None]:
    """One per-tensor ``(scale, zero_point)`` for the activations ``stats`` describe.

    Args:
      stats: accumulated :class:`ActStats` (at least one update).
      spec: the activation (lhs) spec: format and symmetry.
      method: a :class:`StaticActivation` (or its value).

    Returns:
      ``(scale, zero_point)``, each ``[]`` (``zero_point`` None when symmetric).
    """
    method = static_activation_method(method, check_config=False)
    if method is StaticActivation.ABSMAX:
        lo, hi = stats.min, stats.max
    else:
        lo, hi = stats.pct_lo, stats.pct_hi
    # An empty statistic (count 0) has lo=inf, hi=-inf: fall back to a zero range (scale 1).
    lo = jnp.where(jnp.isfinite(lo), jnp.minimum(lo, 0.0), 0.0)
    hi = jnp.where(jnp.isfinite(hi), jnp.maximum(hi, 0.0), 0.0)
    return compute_scale(lo, hi, spec)


# --- drivers ------------------------------------------------------------------------------------


def calibrate_model(
    model: nn.Module, params: Any, batches: Iterable[Any], *, quant_stats: Any = None
) -> Any:
    """Runs ``model`` in ``CALIBRATE`` mode over ``batches`` and returns the ``quant_stats``.

    (Not :func:`jaxquant.calibrate`, which computes the range of one tensor.)

    Args:
      model: a module with a ``mode`` attribute (e.g. :class:`~jaxquant.nn.Transformer`).
      params: its float params.
      batches: iterable of inputs; a tuple is splatted into ``apply``.
      quant_stats: statistics to continue from, or None to start fresh.

    Returns:
      The ``quant_stats`` collection (a tree of :class:`ActStats`, keyed by module path).

    Example:
      >>> stats = calibrate_model(model, params, [tokens[:8], tokens[8:]])  # doctest: +SKIP
    """
    cal = model.clone(mode=QuantMode.CALIBRATE)
    stats = quant_stats
    n = 0
    for batch in batches:
        stats = _calibrate_step(cal, params, stats, batch if isinstance(batch, tuple) else (batch,))
        n += 1
    if n == 0:
        raise ValueError("calibrate_model got no batches; pass at least one input batch.")
    return stats


def convert(model: nn.Module, params: Any, *example_args: Any, quant_stats: Any = None) -> Any:
    """Turns float params into serving params for ``model.clone(mode=QuantMode.SERVE)``.

    Every layer whose config quantizes its kernel gets a :class:`~jaxquant.core.QArray` kernel
    (exactly ``quantize_operand(kernel, config.rhs, contracting_axes)``, so SERVE reproduces
    the TRAIN-mode quantized forward; a ``learned_scale`` layer quantizes with its learned
    ``kernel_scale``, which is then dropped); layers that asked for a static activation scale
    also get ``lhs_scale`` (and ``lhs_zero_point``) from ``quant_stats``. Nothing else changes.

    Args:
      model: the model (any mode; it is cloned into ``CONVERT``).
      params: its float params.
      *example_args: one input to trace the model with (its values don't matter). Omit it for
        models that define ``example_inputs()`` (the :class:`~jaxquant.nn.Transformer` does).
      quant_stats: from :func:`calibrate_model`; needed when a layer uses static activation scales.

    Returns:
      The serving params (QArray leaves for the quantized kernels).

    Example:
      >>> serve_params = convert(model, params)  # doctest: +SKIP
      >>> logits = model.clone(mode=QuantMode.SERVE).apply({"params": serve_params}, tokens)  # doctest: +SKIP
    """
    if not example_args:
        if not hasattr(model, "example_inputs"):
            raise ValueError(
                f"convert needs an example input for {type(model).__name__}: pass it after "
                "params, e.g. convert(model, params, x)."
            )
        example_args = tuple(model.example_inputs())
    conv = model.clone(mode=QuantMode.CONVERT)
    variables = {"params": params}
    if quant_stats is not None:
        variables[STATS_COLLECTION] = quant_stats
    return _convert_apply(conv, variables, tuple(example_args))


# Module-level jits with the module static: repeated calls on an equal model reuse the
# compilation, and params are arguments (never constants baked into the program).
@functools.partial(jax.jit, static_argnums=0)
def _calibrate_step(model, params, stats, args):
    variables = {"params": params}
    if stats is not None:
        variables[STATS_COLLECTION] = stats
    _, new = model.apply(variables, *args, mutable=[STATS_COLLECTION])
    return new[STATS_COLLECTION]


@functools.partial(jax.jit, static_argnums=0)
def _convert_apply(model, variables, args):
    _, new = model.apply(variables, *args, mutable=["params"])
    return drop_learned_scales(new["params"])


def drop_learned_scales(params: Any) -> Any:
    """``params`` without the :data:`LEARNED_SCALE` entries (already inside the QArrays)."""
    if not isinstance(params, dict):
        return params
    return {k: drop_learned_scales(v) for k, v in params.items() if k != LEARNED_SCALE}
