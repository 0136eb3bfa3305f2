"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights before W8A8.

For linears sharing an input ``x [.., d_in]`` behind an RMSNorm with scale ``g [d_in]``::

    s_j = max|x_j|^alpha / max_i |W_ji|^(1 - alpha)
    g <- g / s,   W <- diag(s) W

``x @ W`` is unchanged in float (folding is exact up to rounding), while the
activation's per-channel range is flattened so per-token int8 loses less. The folding
itself is in :mod:`jaxquant.ptq.folding`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


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
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    w_max = jnp.max(jnp.stack([jnp.max(jnp.abs(k), axis=1) for k in kernels]), axis=0)
    a = jnp.maximum(act_absmax.astype(jnp.float32), 1e-5)
    w = jnp.maximum(w_max.astype(jnp.float32), 1e-5)
    return jnp.clip(a**alpha / w ** (1.0 - alpha), 1e-5, 1e5)
