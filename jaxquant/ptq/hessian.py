"""Input statistics of a linear layer, as optax-style init/update pure functions.

``H = 2 X^T X / n`` (GPTQ's Hessian of the layer-wise squared error) and the per-channel
``max |X|`` and ``mean |X|`` (SmoothQuant, AWQ), accumulated over calibration batches.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class InputStats(NamedTuple):
    """Accumulated statistics of the inputs ``x [..., d_in]`` of one linear layer.

    Attributes:
      xtx: ``[d_in, d_in]`` sum of ``x^T x`` over all tokens (float32).
      abs_max: ``[d_in]`` running ``max |x|`` per input channel.
      abs_sum: ``[d_in]`` running ``sum |x|`` per input channel.
      count: number of tokens seen.
    """

    xtx: jax.Array
    abs_max: jax.Array
    abs_sum: jax.Array
    count: jax.Array


def stats_init(d_in: int, *, hessian: bool = True) -> InputStats:
    """Empty statistics for a layer with ``d_in`` inputs (``hessian=False`` skips ``xtx``)."""
    xtx = jnp.zeros((d_in, d_in) if hessian else (0, 0), jnp.float32)
    return InputStats(xtx, jnp.zeros((d_in,), jnp.float32), jnp.zeros((d_in,), jnp.float32),
                      jnp.zeros((), jnp.int32))


@jax.jit
def stats_update(state: InputStats, x: jax.Array) -> InputStats:
    """Adds the tokens of ``x [..., d_in]`` to ``state``."""
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    xtx = state.xtx
    if xtx.shape[0]:
        xtx = xtx + jnp.einsum("ni,nj->ij", x2, x2, precision="highest")
    ax = jnp.abs(x2)
    return InputStats(
        xtx,
        jnp.maximum(state.abs_max, ax.max(axis=0)),
        state.abs_sum + ax.sum(axis=0),
        state.count + x2.shape[0],
    )


def hessian(state: InputStats) -> jax.Array:
    """GPTQ's ``H = 2 X^T X / n``, ``[d_in, d_in]``."""
    if not state.xtx.shape[0]:
        raise ValueError("These statistics were accumulated with hessian=False.")
    return 2.0 * state.xtx / jnp.maximum(state.count, 1).astype(jnp.float32)


def abs_mean(state: InputStats) -> jax.Array:
    """Per-channel ``mean |x|``, ``[d_in]``."""
    return state.abs_sum / jnp.maximum(state.count, 1).astype(jnp.float32)
