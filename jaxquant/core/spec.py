"""`QuantSpec`: how to quantize one tensor.

Lingo:
  * **channel axes** keep their own scale: a ``[in, out]`` kernel with ``channel_axes=(1,)``
    has one scale per output column.
  * **shared axes** are all the others; their elements share a scale.
  * **groups** tile one shared axis (``group_axis``) into blocks of ``group_size`` elements,
    each block with its own scale (sub-channel quantization).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxquant.core.qtypes import QKind, canonical_qtype, get_qtype
from jaxquant.core.serialization import JsonConfig, as_tuple

CALIBRATIONS = ("absmax", "minmax", "percentile", "mse", "absmean")
ROUNDINGS = ("nearest", "stochastic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec(JsonConfig):
    """How to quantize a tensor. Frozen; derive variants with ``dataclasses.replace``.

    Attributes:
      qtype: ``"int2"`` .. ``"int8"``, ``"ternary"`` (codes ``{-1, 0, 1}``), ``"binary"``
        (sign codes ``{-1, 1}``), ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"nf4"``,
        ``"fp4_e2m1"``, or a jnp dtype (``jnp.int8``, ``jnp.int4``, ``jnp.float8_e4m3fn``...).
        Stored canonical.
      channel_axes: axes that keep their own scale; every other axis is shared.
      group_size: ``None``, or tile ``group_axis`` into groups of this many elements.
      group_axis: the shared axis to tile; may be omitted when exactly one axis is shared.
      symmetric: ``False`` uses a zero point and the min/max range (int formats only).
      calibration: ``"absmax"``, ``"minmax"``, ``"percentile"``, ``"mse"`` (clip search) or
        ``"absmean"`` (the range is ``+-mean |x|``, so ``scale = mean |x| / qmax``: BitNet
        b1.58's ternary scale, and the L2-optimal scale of sign codes; symmetric only). None
        (the default) is the format's own: ``"absmean"`` for ternary and binary, ``"absmax"``
        for every other format. Stored resolved, so ``QuantSpec().calibration == "absmax"``
        (and ``dataclasses.replace(spec, qtype=...)`` keeps it: pass ``calibration=None`` too
        to get the new format's own).
      percentile: for ``calibration="percentile"``, the percentile of ``|x|`` (or of x at both
        ends when asymmetric) taken as the range, in ``(50, 100]``.
      mse_grid: for ``calibration="mse"``, number of clip ratios tried.
      mse_min_ratio: for ``calibration="mse"``, the smallest clip ratio tried, in ``(0, 1)``.
      rounding: ``"nearest"`` or ``"stochastic"`` (then :func:`quantize` needs ``key=``).
      scale_dtype: dtype of the stored scales and zero points.
      full_range: symmetric int grids use every code ``qmin..qmax``: the scale is the
        signed extreme of the range divided by ``qmin``, so the largest-magnitude element
        lands on ``qmin`` exactly (llama.cpp's Q4_0: ``d = max / -8``). The scale may then be
        negative. False (default): codes ``-qmax..qmax`` and ``scale = absmax / qmax``.
        ``int2`` .. ``int8`` only (ternary and binary grids are already mirror-symmetric).
      fp16_scales: round the scale (and, when asymmetric, the range minimum that the zero
        point encodes) to float16 *before* the codes are chosen, as llama.cpp's Q4_0, Q4_1
        and Q8_0 blocks store them. Asymmetric: ``zero_point = qmin - f16(lo) / scale``.

    Serializes with ``to_dict`` / ``from_dict`` and ``to_json`` / ``from_json`` (exact round trip).

    Example:
      >>> spec = QuantSpec(qtype="int4", channel_axes=(1,), group_size=128, group_axis=0)
      >>> QuantSpec.from_json(spec.to_json()) == spec
      True
    """

    qtype: str = "int8"
    channel_axes: tuple[int, ...] = ()
    group_size: int | None = None
    group_axis: int | None = None
    symmetric: bool = True
    calibration: str | None = None
    percentile: float = 99.99
    mse_grid: int = 20
    mse_min_ratio: float = 0.5
    rounding: str = "nearest"
    scale_dtype: str = "float32"
    full_range: bool = False
    fp16_scales: bool = False

    def __post_init__(self):
        object.__setattr__(self, "qtype", canonical_qtype(self.qtype))
        qt = get_qtype(self.qtype)
        axes = self.channel_axes
        if isinstance(axes, int):
            axes = (axes,)
        if not isinstance(axes, Sequence) or not all(
            isinstance(a, int) and not isinstance(a, bool) for a in axes
        ):
            raise ValueError(f"channel_axes must be a tuple of ints, got {self.channel_axes!r}.")
        if len(set(axes)) != len(axes):
            raise ValueError(f"channel_axes has repeated axes: {axes}.")
        object.__setattr__(self, "channel_axes", tuple(axes))
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
                raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}.")
            if self.group_size < 1:
                raise ValueError(f"group_size must be >= 1, got {self.group_size}.")
            if self.group_axis is not None and self.group_axis in axes:
                raise ValueError(
                    f"group_axis={self.group_axis} is also a channel axis; groups tile a shared "
                    "axis. Remove it from channel_axes or pick another group_axis."
                )
        elif self.group_axis is not None:
            raise ValueError("group_axis was given without group_size; set group_size too.")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {self.symmetric!r}.")
        if self.calibration is None:
            object.__setattr__(self, "calibration", qt.default_calibration)
        if self.calibration not in CALIBRATIONS:
            raise ValueError(
                f"Unknown calibration {self.calibration!r}; use one of {CALIBRATIONS}."
            )
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"Unknown rounding {self.rounding!r}; use one of {ROUNDINGS}.")
        if not self.symmetric and (qt.kind is not QKind.INT or qt.codes is not None):
            raise ValueError(
                f"symmetric=False needs an int qtype int2..int8; {self.qtype} is a {qt.kind} "
                "format with a fixed zero. Use symmetric=True or an int qtype."
            )
        if self.rounding == "stochastic" and qt.kind is not QKind.INT:
            raise ValueError(
                f"stochastic rounding is implemented for int qtypes, not {self.qtype}."
            )
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}.")
        if not (isinstance(self.mse_grid, int) and self.mse_grid >= 1):
            raise ValueError(f"mse_grid must be an int >= 1, got {self.mse_grid!r}.")
        if not 0.0 < float(self.mse_min_ratio) < 1.0:
            raise ValueError(f"mse_min_ratio must be in (0, 1), got {self.mse_min_ratio}.")
        if not isinstance(self.full_range, bool) or not isinstance(self.fp16_scales, bool):
            raise ValueError(
                f"full_range and fp16_scales must be True or False, got {self.full_range!r} "
                f"and {self.fp16_scales!r}."
            )
        if self.full_range and (not qt.has_full_range or not self.symmetric):
            raise ValueError(
                f"full_range=True is a symmetric int grid; got qtype={self.qtype}, "
                f"symmetric={self.symmetric}. Use an int qtype int2..int8 with symmetric=True "
                "(ternary and binary grids are already mirror-symmetric)."
            )
        if self.calibration == "absmean" and (not self.symmetric or self.full_range):
            raise ValueError(
                "calibration='absmean' is a symmetric range (+-mean |x|); it can't be combined "
                f"with symmetric={self.symmetric}, full_range={self.full_range}. Use "
                "calibration='minmax' for a zero point, or 'absmax' for the full-range grid."
            )
        if self.scale_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"scale_dtype must be 'float32', 'bfloat16' or 'float16', got {self.scale_dtype!r}."
            )

    @classmethod
    def _decoders(cls):
        return {"channel_axes": as_tuple}

    @property
    def qt(self):
        """The :class:`~jaxquant.core.qtypes.QType` of this spec."""
        return get_qtype(self.qtype)

    @property
    def bits(self) -> int:
        return self.qt.bits


@dataclasses.dataclass(frozen=True)
class Layout:
    """A spec resolved against a concrete shape: which axes are channels and which is grouped.

    Attributes:
      shape: the tensor's shape.
      channel_axes: non-negative channel axes.
      group_axis: non-negative grouped axis, or None.
      group_size: elements per group, or None.
    """

    shape: tuple[int, ...]
    channel_axes: tuple[int, ...]
    group_axis: int | None
    group_size: int | None

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of the scale: full on channel axes, groups on the grouped axis, else 1."""
        out = []
        for a, n in enumerate(self.shape):
            if a in self.channel_axes:
                out.append(n)
            elif a == self.group_axis:
                out.append(n // self.group_size)
            else:
                out.append(1)
        return tuple(out)


def _normalize_axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what} {axis} is out of range for a tensor of rank {ndim}.")
    return axis % ndim


def resolve_layout(spec: QuantSpec, shape: Sequence[int]) -> Layout:
    """Resolves ``spec``'s axes against ``shape``.

    Raises:
      ValueError: if an axis is out of range, the group axis is ambiguous, or ``group_size``
        does not divide the grouped axis.
    """
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    channel = tuple(sorted(_normalize_axis(a, ndim, "channel axis") for a in spec.channel_axes))
    if len(set(channel)) != len(channel):
        raise ValueError(f"channel_axes {spec.channel_axes} name the same axis twice for rank {ndim}.")
    group_axis = None
    if spec.group_size is not None:
        shared = [a for a in range(ndim) if a not in channel]
        if spec.group_axis is None:
            if len(shared) != 1:
                raise ValueError(
                    f"group_size={spec.group_size} with {len(shared)} shared axes {shared} of "
                    f"shape {shape} is ambiguous: set group_axis to one of them."
                )
            group_axis = shared[0]
        else:
            group_axis = _normalize_axis(spec.group_axis, ndim, "group_axis")
            if group_axis in channel:
                raise ValueError(f"group_axis {spec.group_axis} is also a channel axis.")
        n = shape[group_axis]
        if n % spec.group_size:
            raise ValueError(
                f"group_size={spec.group_size} does not divide axis {group_axis} of size {n} "
                f"(shape {shape}). Pick a group size that divides {n}, e.g. "
                f"{_divisor_hint(n, spec.group_size)}."
            )
    return Layout(shape, channel, group_axis, spec.group_size)


def _divisor_hint(n: int, g: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - g))
