"""Double quantization (QLoRA): block-wise 4-bit codes whose block scales are quantized again.

Lingo: a **block** is ``block_size`` consecutive elements along ``axis`` (the kernel's input, or
contracting, axis) that share one first-level scale ``s`` (absmax, so ``|x| <= s``); the block
scales, in row-major order, are cut into **scale blocks** of ``scale_block_size``, each with one
second-level float scale ``s2``. Following the QLoRA paper (Dettmers et al., 2023, section 3),
the first-level scales are centred on their mean ``m`` (one float per tensor) before the 8-bit
quantization::

    s_hat = max(m + k * s2, 0)                # k: int8 code in [-127, 127], one per block
    x_hat = C(code) * s_hat                   # C: the 4-bit format's value (nf4: codebook[code])

Storage per element with nf4, blocks of 64 and scale blocks of 256:
``4 + 8 / 64 + 32 / (64 * 256)`` bits (about 0.516 bytes), against ``4 + 32 / 64`` (0.5625
bytes) for plain block-wise nf4 with float32 scales.

**Error bound** (rounding to nearest). The codes are computed with the exact scale ``s`` (as
bitsandbytes does), so ``|x - C s| <= s * g(x / s) / 2`` with ``g`` the gap between the two
grid values around ``x / s`` (nf4: at most ``1 - 0.696 = 0.304``). The 8-bit scale code is
within half a step of ``s - m``: ``|s - s_hat| <= s2 / 2`` with
``s2 = max |s - m| over its scale block / 127`` (rounded up to 17 significant bits, which
makes ``k * s2`` exact in float32 and the dequantized bits independent of XLA's fusion; clamping
at 0 only moves ``s_hat`` closer to ``s >= 0``). With ``|C| <= 1``::

    |x - x_hat| <= |x - C s| + |C| |s - s_hat| <= s * g(x / s) / 2 + s2 / 2

The 4-bit level is :func:`~jaxquant.core.quantize` with ``QuantSpec(qtype, channel_axes=<the
other axes>, group_size=block_size, group_axis=axis)``, so :meth:`DoubleQuantArray.to_qarray`
gives an ordinary :class:`~jaxquant.core.QArray` (with the dequantized scales) that
``jaxquant.dot_general`` serves as is.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core.qarray import QArray, quantize
from jaxquant.core.qtypes import get_qtype
from jaxquant.core.spec import QuantSpec

__all__ = ["SCALE_QMAX", "DoubleQuantArray", "double_quantize", "quantize_scales"]

SCALE_QMAX = 127  # the 8-bit scale codes use the symmetric range [-127, 127]
_S2_DROP_BITS = 7  # s2 keeps 24 - 7 = 17 significant bits: k * s2 (|k| <= 127) is exact in f32


def _round_up_significand(v: jax.Array) -> jax.Array:
    """``v >= 0`` (finite float32) rounded up to 17 significant bits.

    With ``|k| <= 127`` (7 bits) the product ``k * s2`` then fits float32's 24 bits exactly, so
    ``mean + k * s2`` rounds once whether or not XLA fuses it into an fma: the dequantized
    scales, hence the weights, are the same bits eagerly, under ``jit`` and in any fusion.
    Rounding up keeps ``max |s - mean| / s2 <= 127``: no code is clipped.
    """
    u = jax.lax.bitcast_convert_type(v.astype(jnp.float32), jnp.uint32)
    mask = jnp.uint32((1 << _S2_DROP_BITS) - 1)
    u = (u + mask) & ~mask
    return jax.lax.bitcast_convert_type(u, jnp.float32)


@dataclasses.dataclass(frozen=True)
class DoubleQuantArray:
    """A block-quantized tensor whose block scales are themselves 8-bit (a frozen pytree).

    Invariant, with ``R(t)`` repeating each second-level scale ``scale_block_size`` times over
    the row-major flattened block scales, and ``G(t)`` repeating each block scale ``group_size``
    times along ``group_axis``::

        s_hat = max(scale_mean + scale_codes * R(scale_scale), 0)      # scale_codes' shape
        x    ~= C(qvalue) * G(s_hat)

    Attributes:
      qvalue: the packed first-level codes (``uint8``, two 4-bit codes per byte along
        ``pack_axis``), exactly as in the :class:`QArray` of the same layout.
      scale_codes: ``int8`` codes of the block scales, shape ``[..., shape[group_axis] //
        group_size, ...]`` (the QArray scale shape).
      scale_scale: ``float32 [ceil(n_blocks / scale_block_size)]`` second-level scales.
      scale_mean: ``float32 []``, the mean of the block scales (subtracted before quantizing).
      qtype, shape, dtype, channel_axes, group_axis, group_size, pack_axis: as in
        :class:`QArray` (static).
      scale_block_size: block scales per second-level scale (static).
    """

    qvalue: jax.Array
    scale_codes: jax.Array
    scale_scale: jax.Array
    scale_mean: jax.Array
    qtype: str = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
    channel_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    group_axis: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    pack_axis: int | None = dataclasses.field(metadata=dict(static=True))
    scale_block_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """True storage in bytes: codes, 8-bit scale codes, second-level scales and the mean."""
        return sum(
            int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
            for a in (self.qvalue, self.scale_codes, self.scale_scale, self.scale_mean)
        )

    @property
    def bits_per_element(self) -> float:
        """Storage bits per logical element, all levels of scales included."""
        return 8.0 * self.nbytes / max(1, self.size)

    def block_scales(self) -> jax.Array:
        """The dequantized first-level scales ``s_hat`` (``float32``, ``scale_codes``' shape)."""
        n = int(np.prod(self.scale_codes.shape))
        s2 = jnp.repeat(self.scale_scale.astype(jnp.float32), self.scale_block_size)[:n]
        s2 = s2.reshape(self.scale_codes.shape)
        s = self.scale_mean.astype(jnp.float32) + self.scale_codes.astype(jnp.float32) * s2
        return jnp.maximum(s, 0.0)

    def to_qarray(self) -> QArray:
        """The first level as an ordinary :class:`QArray` (same codes, scales ``s_hat``)."""
        return QArray(
            qvalue=self.qvalue,
            scale=self.block_scales(),
            zero_point=None,
            qtype=self.qtype,
            shape=self.shape,
            dtype=self.dtype,
            channel_axes=self.channel_axes,
            group_axis=self.group_axis,
            group_size=self.group_size,
            pack_axis=self.pack_axis,
        )

    def dequantize(self, dtype=None) -> jax.Array:
        """The float tensor these codes represent, shape ``shape`` (default dtype ``dtype``)."""
        return self.to_qarray().dequantize(dtype)

    def __repr__(self) -> str:
        return (
            f"DoubleQuantArray(qtype={self.qtype}, shape={self.shape}, "
            f"group_size={self.group_size}, scale_block_size={self.scale_block_size}, "
            f"nbytes={self.nbytes})"
        )


jax.tree_util.register_dataclass(
    DoubleQuantArray,
    data_fields=["qvalue", "scale_codes", "scale_scale", "scale_mean"],
    meta_fields=[
        "qtype",
        "shape",
        "dtype",
        "channel_axes",
        "group_axis",
        "group_size",
        "pack_axis",
        "scale_block_size",
    ],
)


def _check_int(name: str, v, lo: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"double_quantize: {name} must be an int >= {lo}, got {v!r}.")


def quantize_scales(
    s: jax.Array, scale_block_size: int = 256
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The second level: ``s`` (any shape) -> ``(codes int8 [s.shape], s2 f32 [m], mean f32 [])``.

    ``s`` is flattened row-major, centred on its mean and cut into ``m = ceil(size /
    scale_block_size)`` blocks; each block gets ``s2 = max |s - mean| / 127`` (rounded up to 17
    significant bits, so that dequantizing is exact-reproducible: see
    :func:`_round_up_significand`) and codes ``round((s - mean) / s2)`` (0 for an all-equal
    block).
    """
    _check_int("scale_block_size", scale_block_size)
    s = jnp.asarray(s, jnp.float32)
    flat = s.reshape(-1)
    n = flat.shape[0]
    mean = jnp.mean(flat)
    d = flat - mean
    m = -(-n // scale_block_size)
    d = jnp.pad(d, (0, m * scale_block_size - n)).reshape(m, scale_block_size)
    s2 = _round_up_significand(jnp.max(jnp.abs(d), axis=1) / SCALE_QMAX)
    safe = jnp.where(s2 > 0, s2, 1.0)
    k = jnp.clip(jnp.round(d / safe[:, None]), -SCALE_QMAX, SCALE_QMAX)
    k = jnp.where(s2[:, None] > 0, k, 0.0).astype(jnp.int8)
    return k.reshape(-1)[:n].reshape(s.shape), s2, mean


def double_quantize(
    x: jax.Array,
    qtype: str = "nf4",
    *,
    block_size: int = 64,
    axis: int = 0,
    scale_block_size: int = 256,
) -> DoubleQuantArray:
    """Quantizes ``x`` in blocks of ``block_size`` along ``axis`` and its block scales to 8 bits.

    Args:
      x: float tensor, e.g. a kernel ``[d_in, d_out]`` with ``axis=0`` (blocks of inputs).
      qtype: the first-level format (``"nf4"``, the QLoRA default; any symmetric format of
        :data:`~jaxquant.core.QTYPES` works).
      block_size: elements per first-level block; must divide ``x.shape[axis]``.
      axis: the blocked axis; every other axis keeps its own scales.
      scale_block_size: block scales per second-level float32 scale.

    Returns:
      A :class:`DoubleQuantArray`.

    Raises:
      ValueError: a block size that does not divide the axis, a bad axis or size, a non-float
        or NaN/inf ``x``.

    Example:
      >>> dq = double_quantize(jnp.ones((128, 64)), "nf4", block_size=64)
      >>> dq.qvalue.shape, dq.scale_codes.shape, dq.scale_scale.shape
      ((64, 64), (2, 64), (1,))
    """
    get_qtype(qtype)
    _check_int("block_size", block_size)
    _check_int("scale_block_size", scale_block_size)
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("double_quantize needs a tensor with at least one axis, got a scalar.")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"double_quantize: axis {axis} out of range for shape {x.shape}.")
    axis = axis % x.ndim
    if x.shape[axis] % block_size:
        raise ValueError(
            f"double_quantize: block_size {block_size} does not divide axis {axis} of shape "
            f"{tuple(x.shape)}; pick a block size that divides {x.shape[axis]}."
        )
    others = tuple(a for a in range(x.ndim) if a != axis)
    spec = QuantSpec(qtype=qtype, channel_axes=others, group_size=block_size, group_axis=axis)
    q = quantize(x, spec)
    codes, s2, mean = quantize_scales(q.scale, scale_block_size)
    return DoubleQuantArray(
        qvalue=q.qvalue,
        scale_codes=codes,
        scale_scale=s2,
        scale_mean=mean,
        qtype=q.qtype,
        shape=q.shape,
        dtype=q.dtype,
        channel_axes=q.channel_axes,
        group_axis=q.group_axis,
        group_size=q.group_size,
        pack_axis=q.pack_axis,
        scale_block_size=scale_block_size,
    )
