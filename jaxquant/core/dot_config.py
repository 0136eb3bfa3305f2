"""`DotGeneralConfig`: how a quantized `dot_general` treats its operands, forward and backward.

Lingo (as in AQT): a ``dot_general`` has a **lhs** and a **rhs** operand; each has
**contracting** axes (summed over), **batch** axes (paired, kept) and **free** axes (kept).
Inside a dot_general the scale layout of an operand is derived from the dimension numbers:
one scale per element of the non-contracting (batch and free) axes, shared over the
contracting axes, or per group of ``group_size`` along the innermost contracting axis (see
:func:`~jaxquant.core.dot_general.operand_spec`). So the
specs given here only choose the format, symmetry, calibration, rounding and group size; their
``channel_axes`` and ``group_axis`` must be left empty.

The backward pass of ``y = dot(lhs, rhs)`` has two products: ``dlhs = dot(g, rhs)`` and
``drhs = dot(lhs, g)``, where ``g`` is the output gradient. Each may be quantized with its
own :class:`BackwardSpec` (as in AQT's ``fwd`` / ``dlhs`` / ``drhs``).
"""

from __future__ import annotations

import dataclasses

from jaxquant.core.serialization import JsonConfig
from jaxquant.core.spec import QuantSpec

TILING_MODES = ("auto", "always", "never")


def _check_operand_spec(spec: QuantSpec | None, name: str) -> None:
    if spec is None:
        return
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"{name} must be a QuantSpec or None, got {type(spec).__name__}.")
    if spec.channel_axes or spec.group_axis is not None:
        raise ValueError(
            f"{name}: inside dot_general the scale axes come from the dimension numbers (one "
            "scale per non-contracting index, groups along the contracting axis). Leave "
            f"channel_axes and group_axis unset; got channel_axes={spec.channel_axes}, "
            f"group_axis={spec.group_axis}."
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackwardSpec(JsonConfig):
    """Quantization of one backward product.

    Attributes:
      grad: spec for the incoming output gradient, or None to keep it in float.
      operand: spec for the saved forward operand it multiplies, or None for float.
    """

    grad: QuantSpec | None = None
    operand: QuantSpec | None = None

    def __post_init__(self):
        _check_operand_spec(self.grad, "BackwardSpec.grad")
        _check_operand_spec(self.operand, "BackwardSpec.operand")

    @classmethod
    def _decoders(cls):
        return {"grad": QuantSpec.from_dict, "operand": QuantSpec.from_dict}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotGeneralConfig(JsonConfig):
    """How :func:`jaxquant.dot_general` quantizes. Frozen; use ``dataclasses.replace``.

    Attributes:
      lhs: forward spec of the lhs (typically activations), or None for float.
      rhs: forward spec of the rhs (typically weights), or None for float.
      dlhs: backward product ``g x rhs -> d lhs``; None is a float backward with the
        straight-through estimator (gradients of the dequantized operands).
      drhs: backward product ``lhs x g -> d rhs``; None likewise.
      int_dot: run the product on integer codes (int8 x int8 -> int32) when both operands are
        symmetric ints of <= 8 bits. False computes the same product in float (the reference).
      seed: seeds the keys of stochastic rounding when no key is threaded; the key of each
        call is derived deterministically from this seed and the operand values.
      tiling: the tiled decode kernels for a lhs of few rows (at most
        :data:`~jaxquant.core.tiled_dot.MAX_TILED_ROWS`) times a served QArray weight: the
        weight-only product (:mod:`~jaxquant.core.tiled_dot`) and the W4A8 integer product
        (:mod:`~jaxquant.core.w4a8`). ``"auto"`` (the default) uses them on XLA:CPU, where they
        were measured to pay, and elsewhere keeps the untiled paths (XLA:GPU fuses the
        dequantization into the GEMM); ``"always"`` uses them on any backend; ``"never"``
        never. The result is the same up to float reassociation.

    Serializes with ``to_dict`` / ``from_dict`` and ``to_json`` / ``from_json`` (nested specs
    included; exact round trip).

    Example:
      >>> cfg = dataclasses.replace(w8a8(), rhs=QuantSpec(qtype="int4", group_size=128))
      >>> DotGeneralConfig.from_json(cfg.to_json()) == cfg
      True
    """

    lhs: QuantSpec | None = None
    rhs: QuantSpec | None = None
    dlhs: BackwardSpec | None = None
    drhs: BackwardSpec | None = None
    int_dot: bool = True
    seed: int = 0
    tiling: str = "auto"

    def __post_init__(self):
        _check_operand_spec(self.lhs, "lhs")
        _check_operand_spec(self.rhs, "rhs")
        for name in ("dlhs", "drhs"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, BackwardSpec):
                raise ValueError(f"{name} must be a BackwardSpec or None, got {type(v).__name__}.")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}.")
        if self.tiling not in TILING_MODES:
            raise ValueError(f"tiling must be one of {TILING_MODES}, got {self.tiling!r}.")

    @classmethod
    def _decoders(cls):
        spec, bwd = QuantSpec.from_dict, BackwardSpec.from_dict
        return {"lhs": spec, "rhs": spec, "dlhs": bwd, "drhs": bwd}

    @property
    def quantizes_backward(self) -> bool:
        return any(
            b is not None and (b.grad is not None or b.operand is not None)
            for b in (self.dlhs, self.drhs)
        )


def w8a8(*, symmetric: bool = True, calibration: str = "absmax") -> DotGeneralConfig:
    """Dynamic int8 on both operands (a scale per non-contracting row / column), float backward."""
    spec = QuantSpec(qtype="int8", symmetric=symmetric, calibration=calibration)
    return DotGeneralConfig(lhs=spec, rhs=spec)


def weight_only(
    qtype="int8",
    group_size: int | None = None,
    *,
    symmetric: bool = True,
    calibration: str | None = None,
    full_range: bool = False,
) -> DotGeneralConfig:
    """Quantized weights (rhs) times float activations; float backward.

    Args:
      qtype: weight format (``"int8"``, ``"int4"``, ``"nf4"``, ``"ternary"``, ``"binary"``...).
      group_size: None for one scale per output column, else groups along the contraction.
      symmetric: False adds a zero point per column / group.
      calibration: range calibration of the weights; None is the format's own (``"absmax"``,
        or ``"absmean"`` for ternary and binary).
      full_range: a symmetric int grid that uses every code (int4: -8..7, as llama.cpp's Q4_0
        and the command line's recipes do) instead of ``-qmax..qmax``
        (:attr:`~jaxquant.core.spec.QuantSpec.full_range`).
    """
    spec = QuantSpec(qtype=qtype, group_size=group_size, symmetric=symmetric,
                     calibration=calibration, full_range=full_range)
    return DotGeneralConfig(rhs=spec)


def w4a8(qtype="int4", group_size: int | None = 128) -> DotGeneralConfig:
    """Sub-byte weights times dynamic int8 activations (a scale per row): the integer product.

    The weight codes (``int4``, ``int3``, ``int2``; symmetric, a scale per group of
    ``group_size`` along the input axis, or per output column when None) are widened to int8
    and multiplied with the int8 activation codes into int32 sums, one per group, then scaled
    (:mod:`jaxquant.core.w4a8`). Float backward.
    """
    return DotGeneralConfig(lhs=QuantSpec(qtype="int8"),
                            rhs=QuantSpec(qtype=qtype, group_size=group_size))


def fully_quantized(
    fwd="int8", bwd="int8", *, stochastic_grad: bool = True, seed: int = 0
) -> DotGeneralConfig:
    """AQT-style: both forward operands and both backward products quantized.

    The gradient uses stochastic rounding by default (unbiased, as in AQT); its keys derive
    from ``seed`` and the gradient values, so the user threads nothing.
    """
    f = QuantSpec(qtype=fwd)
    g = QuantSpec(qtype=bwd, rounding="stochastic" if stochastic_grad else "nearest")
    o = QuantSpec(qtype=bwd)
    bwd_spec = BackwardSpec(grad=g, operand=o)
    return DotGeneralConfig(lhs=f, rhs=f, dlhs=bwd_spec, drhs=bwd_spec, seed=seed)


def fp8() -> DotGeneralConfig:
    """fp8: e4m3 forward operands, e5m2 gradients with e4m3 operands in the backward."""
    f = QuantSpec(qtype="fp8_e4m3")
    bwd_spec = BackwardSpec(grad=QuantSpec(qtype="fp8_e5m2"), operand=f)
    return DotGeneralConfig(lhs=f, rhs=f, dlhs=bwd_spec, drhs=bwd_spec)
