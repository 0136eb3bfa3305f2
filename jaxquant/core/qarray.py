"""`QArray`: a quantized tensor, and `quantize` / `dequantize`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core import calibration, packing
from jaxquant.core.qtypes import QKind, get_qtype
from jaxquant.core.spec import Layout, QuantSpec, resolve_layout
from jaxquant.errors import JaxquantError


@dataclasses.dataclass(frozen=True)
class QArray:
    """An immutable quantized tensor (a pytree: arrays are children, the rest is static).

    Invariant, with ``G(t)`` repeating ``t`` ``group_size`` times along ``group_axis`` (identity
    when ungrouped) and ``C(q)`` the unpacked codes (``codebook[q]`` for nf4/fp4)::

        x ~= (C(qvalue) - G(zero_point)) * G(scale)

    ``scale`` and ``zero_point`` have the tensor's rank: full size on ``channel_axes``,
    ``shape[group_axis] // group_size`` on the grouped axis, 1 elsewhere, so they broadcast.

    Attributes:
      qvalue: the stored codes. int formats: ``int8``; fp8: float8; sub-byte formats (int2-int4,
        nf4, fp4, ternary, binary) are packed into ``uint8`` along ``pack_axis``: 2 (4-bit),
        4 (int2, ternary) or 8 (binary) codes per byte.
      scale: float scales, shape ``scale_shape``.
      zero_point: float zero points of the same shape, or None when symmetric.
      qtype: the format's name (``"int4"``, ``"nf4"``, ...).
      shape: the logical (unpacked) shape.
      dtype: dtype that :meth:`dequantize` returns by default (the input's dtype).
      channel_axes, group_axis, group_size: the scale layout.
      pack_axis: the packed axis, or None when unpacked.
    """

    qvalue: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    qtype: str = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
    channel_axes: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    group_axis: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    group_size: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    pack_axis: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def layout(self) -> Layout:
        return Layout(self.shape, self.channel_axes, self.group_axis, self.group_size)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def bits(self) -> int:
        return get_qtype(self.qtype).bits

    @property
    def nbytes(self) -> int:
        """True storage in bytes: codes plus scales plus zero points."""
        total = 0
        for a in (self.qvalue, self.scale, self.zero_point):
            if a is not None:
                total += int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        return total

    @property
    def bits_per_element(self) -> float:
        """Storage bits per logical element, scales and zero points included."""
        return 8.0 * self.nbytes / max(1, int(np.prod(self.shape)))

    def codes(self) -> jax.Array:
        """The unpacked codes, shape ``shape``."""
        qt = get_qtype(self.qtype)
        if self.pack_axis is None:
            return self.qvalue
        return packing.unpack(
            self.qvalue,
            qt.storage_bits,
            self.pack_axis,
            self.shape[self.pack_axis],
            signed=qt.kind is QKind.INT,
        )

    def dequantize(self, dtype=None) -> jax.Array:
        """The float tensor these codes represent, shape ``shape``."""
        return calibration.dequantize_codes(
            self.codes(),
            self.scale,
            self.zero_point,
            self.qtype,
            self.layout,
            dtype=self.dtype if dtype is None else dtype,
        )

    def __repr__(self) -> str:
        return (
            f"QArray(qtype={self.qtype}, shape={self.shape}, scale={tuple(self.scale.shape)}, "
            f"zero_point={'yes' if self.zero_point is not None else 'no'}, "
            f"group_size={self.group_size}, nbytes={self.nbytes})"
        )


jax.tree_util.register_dataclass(
    QArray,
    data_fields=["qvalue", "scale", "zero_point"],
    meta_fields=[
        "qtype",
        "shape",
        "dtype",
        "channel_axes",
        "group_axis",
        "group_size",
        "pack_axis",
    ],
)


def choose_pack_axis(layout: Layout) -> int:
    """The axis to pack along: the grouped axis, else the first shared axis, else the last."""
    if layout.group_axis is not None:
        return layout.group_axis
    shared = [a for a in range(len(layout.shape)) if a not in layout.channel_axes]
    if shared:
        return shared[0]
    return len(layout.shape) - 1


def check_finite(x: jax.Array, what: str = "input") -> None:
    """Raises ``ValueError`` if a concrete ``x`` holds NaN or inf (no-op while tracing).

    Under ``jit`` the values are unknown; there a non-finite element makes only the scale of
    its own channel/group non-finite, so the damage stays in that group. Call this on concrete
    arrays (e.g. before quantizing a checkpoint) to get the error early.
    """
    if isinstance(x, jax.core.Tracer):
        return
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.kind != "V":
        return
    finite = np.isfinite(arr.astype(np.float32))
    if not finite.all():
        bad = np.argwhere(~finite)
        raise ValueError(
            f"{what} has {len(bad)} non-finite values (NaN or inf), first at index "
            f"{tuple(int(i) for i in bad[0])}. Quantizing would spread them through the scale of "
            "their group; clean the tensor first (e.g. jnp.nan_to_num) or find where they came from."
        )


def quantize(
    x: jax.Array,
    spec: QuantSpec,
    key: jax.Array | None = None,
    *,
    scale: jax.Array | None = None,
    zero_point: jax.Array | None = None,
    pack: bool = True,
) -> QArray:
    """Quantizes ``x`` according to ``spec``.

    Args:
      x: float tensor of any shape.
      spec: the :class:`QuantSpec`.
      key: PRNG key, required when ``spec.rounding == "stochastic"``.
      scale: optional precomputed scale of the layout's scale shape (skips calibration: used
        for static activation scales and GPTQ).
      zero_point: optional precomputed zero point (asymmetric specs, with ``scale``).
      pack: pack sub-byte codes (default). ``False`` keeps one int8 code per element.

    Returns:
      A :class:`QArray`.

    Raises:
      ValueError: for a layout that does not fit ``x`` (e.g. a group size that does not divide
        the axis), for a concrete ``x`` holding NaN/inf, or for an empty ``x`` (a
        :class:`~jaxquant.errors.JaxquantError`).

    Example:
      >>> q = quantize(jnp.ones((256, 64)), QuantSpec(qtype="int4", channel_axes=(1,), group_size=128))
      >>> q.qvalue.shape, q.scale.shape
      ((128, 64), (2, 64))
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantize expects a float array, got dtype {x.dtype}.")
    if x.size == 0:
        raise JaxquantError(
            f"quantize got an empty array (shape {x.shape}): there is no value to calibrate a "
            "scale from. Skip empty tensors before quantizing."
        )
    check_finite(x)
    layout = resolve_layout(spec, x.shape)
    if scale is None:
        lo, hi = calibration.calibrate(x, spec, layout)
        scale, zero_point = calibration.compute_scale(lo, hi, spec)
    else:
        if tuple(scale.shape) != layout.scale_shape:
            raise ValueError(
                f"scale has shape {tuple(scale.shape)}, but spec and x.shape={x.shape} need "
                f"{layout.scale_shape}."
            )
        if (zero_point is None) != spec.symmetric:
            raise ValueError("Pass zero_point exactly when the spec is asymmetric.")
    q = calibration.quantize_codes(x, scale, zero_point, spec, layout, key=key)
    qt = spec.qt
    pack_axis = None
    if pack and qt.packed and x.ndim > 0:  # a 0-d tensor has no axis to pack along
        pack_axis = choose_pack_axis(layout)
        q = packing.pack(q, qt.storage_bits, pack_axis)
    return QArray(
        qvalue=q,
        scale=scale,
        zero_point=zero_point,
        qtype=spec.qtype,
        shape=tuple(x.shape),
        dtype=np.dtype(x.dtype),
        channel_axes=layout.channel_axes,
        group_axis=layout.group_axis,
        group_size=layout.group_size,
        pack_axis=pack_axis,
    )


def dequantize(q: QArray, dtype=None) -> jax.Array:
    """The float tensor a :class:`QArray` represents (same as ``q.dequantize()``)."""
    if not isinstance(q, QArray):
        raise TypeError(f"dequantize expects a QArray, got {type(q).__name__}.")
    return q.dequantize(dtype)


def gather_rows(q: QArray, idx: jax.Array) -> QArray:
    """Rows ``idx`` of a QArray quantized with a scale per row (``channel_axes`` start with 0).

    The codes are gathered as stored (still packed), with their scales: an embedding lookup
    that never dequantizes the whole table.

    Args:
      q: a QArray ``[V, ...]`` with channel axis 0, not packed or grouped along axis 0.
      idx: int indices ``[...]`` into axis 0.

    Returns:
      A QArray of shape ``[*idx.shape, *q.shape[1:]]``.

    Raises:
      ValueError: if ``q`` has no scale per row.

    Example:
      >>> q = quantize(jnp.ones((64, 16)), QuantSpec(qtype="int4", channel_axes=(0,)))
      >>> gather_rows(q, jnp.array([[1, 2, 3]])).shape
      (1, 3, 16)
    """
    if q.channel_axes[:1] != (0,) or q.pack_axis == 0 or q.group_axis == 0:
        raise ValueError(
            f"gather_rows needs a QArray with a scale per row (channel axis 0, not packed or "
            f"grouped along it); got channel_axes={q.channel_axes}, pack_axis={q.pack_axis}, "
            f"group_axis={q.group_axis}."
        )
    n = jnp.ndim(idx)
    shift = lambda a: None if a is None else a + n - 1
    take = lambda a: None if a is None else jnp.take(a, idx, axis=0)
    return QArray(
        qvalue=take(q.qvalue),
        scale=take(q.scale),
        zero_point=take(q.zero_point),
        qtype=q.qtype,
        shape=tuple(jnp.shape(idx)) + tuple(q.shape[1:]),
        dtype=q.dtype,
        channel_axes=tuple(range(n)) + tuple(shift(a) for a in q.channel_axes[1:]),
        group_axis=shift(q.group_axis),
        group_size=q.group_size,
        pack_axis=shift(q.pack_axis),
    )
