"""Rotary position embeddings in the two layouts found in LLaMA checkpoints.

Lingo: a head vector ``x [hd]`` is split into ``hd / 2`` pairs; pair ``i`` is rotated by the
angle ``pos * theta ** (-2i / hd)``.

* ``"adjacent"``: pair ``i`` is ``(x[2i], x[2i+1])``: llama.cpp / GGUF (its converter permutes
  the Q and K weight rows of Hugging Face checkpoints into this order).
* ``"half"``: pair ``i`` is ``(x[i], x[i + hd/2])``: Hugging Face's ``rotate_half``.

:func:`half_to_adjacent` is that permutation: ``apply_rope(x, layout="half")`` on a kernel
equals ``apply_rope(x, layout="adjacent")`` on the kernel with permuted output columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """Angles ``[..., hd/2]`` for integer ``positions [...]`` (computed in float32)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    return positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)


def apply_rope(
    x: jax.Array, positions: jax.Array, theta: float, layout: str = "adjacent"
) -> jax.Array:
    """Rotates ``x [B, S, H, hd]`` by the RoPE angles of ``positions [B, S]`` (or ``[S]``).

    Args:
      x: queries or keys, ``[batch, seq, heads, head_dim]``.
      positions: integer positions ``[batch, seq]`` or ``[seq]``.
      theta: the RoPE base.
      layout: ``"adjacent"`` or ``"half"`` (see the module docstring).

    Returns:
      Array like ``x``.

    Example:
      >>> y = apply_rope(jnp.ones((1, 4, 2, 8)), jnp.arange(4), 1e4, "half")
    """
    hd = x.shape[-1]
    if positions.ndim == 1:
        positions = positions[None]
    ang = rope_angles(positions, hd, theta)[:, :, None, :]  # [B, S, 1, hd/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    if layout == "adjacent":
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(xf.shape)
    elif layout == "half":
        x1, x2 = xf[..., : hd // 2], xf[..., hd // 2 :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    else:
        raise ValueError(f"Unknown rope layout {layout!r}; use 'adjacent' or 'half'.")
    return out.astype(x.dtype)


def half_to_adjacent(kernel: jax.Array, n_heads: int) -> jax.Array:
    """Permutes the output columns of a Q or K kernel ``[D, n_heads * hd]`` from the half
    layout to the adjacent one (llama.cpp's converter permutation, on ``[in, out]`` kernels).

    Within each head, new column ``2i`` is old column ``i`` and new ``2i+1`` is old ``i + hd/2``.
    """
    d, n = kernel.shape
    hd = n // n_heads
    k = kernel.reshape(d, n_heads, 2, hd // 2)
    return jnp.swapaxes(k, 2, 3).reshape(d, n)


def adjacent_to_half(kernel: jax.Array, n_heads: int) -> jax.Array:
    """Inverse of :func:`half_to_adjacent`."""
    d, n = kernel.shape
    hd = n // n_heads
    k = kernel.reshape(d, n_heads, hd // 2, 2)
    return jnp.swapaxes(k, 2, 3).reshape(d, n)
