"""Folding per-input-channel scales into the layer before, leaving the float function unchanged.

Used by SmoothQuant and AWQ: ``x @ W == (x / s) @ (diag(s) W)``, and ``x / s`` is absorbed by
the preceding RMSNorm's scale or the preceding linear's output columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def fold_scales(
    prev: jax.Array, kernels: Sequence[jax.Array], s: jax.Array
) -> tuple[jax.Array, list[jax.Array]]:
    """``prev / s`` along its last axis and ``diag(s) W_i``: the float function is unchanged
    when ``prev``'s last axis is the input channels of the ``kernels`` (an RMSNorm scale
    ``[d_in]``, or a linear ``[.., d_in]`` feeding them through an elementwise product).

    Args:
      prev: the param of the op before, ``[..., d_in]``.
      kernels: kernels ``[d_in, d_out_i]`` fed by that op.
      s: per-channel scales ``[d_in]``.
    """
    s = s.astype(jnp.float32)
    return prev / s.astype(prev.dtype), [k * s[:, None].astype(k.dtype) for k in kernels]


def fold_into_norm(
    norm_scale: jax.Array, kernels: Sequence[jax.Array], s: jax.Array
) -> tuple[jax.Array, list[jax.Array]]:
    """``g / s`` and ``diag(s) W_i``: the float function is unchanged.

    Args:
      norm_scale: the preceding RMSNorm's scale ``[d_in]``.
      kernels: kernels ``[d_in, d_out_i]`` fed by that norm.
      s: per-channel scales ``[d_in]``.
    """
    return fold_scales(norm_scale, kernels, s)


def fold_into_linear(
    prev_kernel: jax.Array, kernels: Sequence[jax.Array], s: jax.Array
) -> tuple[jax.Array, list[jax.Array]]:
    """Like :func:`fold_into_norm` when the input comes from a linear ``prev [.., d_in]``
    through an elementwise product (e.g. ``up`` in SwiGLU feeding ``down``): its output
    columns are divided by ``s``."""
    return fold_scales(prev_kernel, kernels, s)
