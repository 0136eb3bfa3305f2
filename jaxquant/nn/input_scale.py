"""A served layer's per-input-channel input scale: ``(x / s) . Q(W * s)``.

AWQ and SmoothQuant move a per-input-channel scale ``s`` between a layer's input and its
kernel. On jaxquant's own Transformer ``1 / s`` folds into the norm before the layer; on any
other model there is no known op to fold into, so the served layer keeps ``s`` itself (as
AutoAWQ's ``ScaledActivation`` does) and divides its input by it right before the quantized
product. In float the layer computes the same function; the divide is one elementwise op.

Lingo: ``s`` has one entry per *contracted input feature*. Its shape
(:func:`input_scale_shape`) is the kernel's contracting axes in ascending kernel-axis order for
a dot / einsum layer (``Dense`` ``[d_in]``; a ``DenseGeneral`` over two axes ``[heads,
head_dim]``), and ``[in]`` (the input-channel axis) for a conv, whose scale is shared by the
window's taps. The divide reads the product's own dimension numbers (or einsum string) to find
which input axes these are, so it runs inside the layer's product hook: :class:`ScaledInput`
wraps the layer's quantized hook and takes ``s`` from :func:`input_scale`, a context the layer's
call enters (linen: the quantizing interceptor; NNX: the served layer's class).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.core.einsum_spec import parse_einsum
from jaxquant.nn.layer_quant import ConvOp, DotOp, EinsumOp, LayerPlan, Op, expand_ellipsis

INPUT_SCALE = "input_scale"  # the variable's name next to the kernel (linen param, NNX attribute)

_ACTIVE = threading.local()


def input_scale_shape(plan: LayerPlan) -> tuple[int, ...]:
    """The shape of ``plan``'s input scale: its contracted kernel axes, ascending (conv:
    ``[in]``, the kernel's input-channel axis)."""
    if plan.op is Op.CONV:
        return (plan.kernel_shape[-2],)
    if plan.op not in (Op.DOT, Op.EINSUM):
        raise ValueError(f"{plan.path}: a {plan.op.value} layer takes no input scale.")
    return tuple(plan.kernel_shape[a] for a in sorted(plan.contracting_axes))


@contextlib.contextmanager
def input_scale(s: jax.Array):
    """The input scale of the layer being called (read by :class:`ScaledInput`)."""
    stack = _ACTIVE.__dict__.setdefault("stack", [])
    stack.append(s)
    try:
        yield
    finally:
        stack.pop()


def _current(plan: LayerPlan) -> jax.Array:
    stack = getattr(_ACTIVE, "stack", None)
    if not stack:
        raise ValueError(
            f"{plan.path}: this layer's product divides its input by the layer's input_scale, "
            "but was called outside the layer (no input scale is active)."
        )
    return stack[-1]


def divide(plan: LayerPlan, x: jax.Array, s: jax.Array, x_axes) -> jax.Array:
    """``x / s`` with axis ``i`` of ``s`` along axis ``x_axes[i]`` of ``x`` (in ``x``'s dtype).

    Raises:
      ValueError: ``s`` is not :func:`input_scale_shape` of ``plan``, or does not fit ``x``.
    """
    s = jnp.asarray(s)
    x_axes = [int(a) % x.ndim for a in x_axes]
    want = input_scale_shape(plan)
    fits = tuple(s.shape) == want and all(x.shape[a] == n for a, n in zip(x_axes, want,
                                                                          strict=True))
    if not fits:
        raise ValueError(
            f"{plan.path}: input_scale has shape {tuple(s.shape)}; this layer needs {want} "
            f"along input axes {tuple(x_axes)} of its input {tuple(x.shape)}."
        )
    order = sorted(range(len(x_axes)), key=x_axes.__getitem__)
    shape = [1] * x.ndim
    for i in order:
        shape[x_axes[i]] = s.shape[i]
    return x / jnp.reshape(jnp.transpose(s, order), shape).astype(x.dtype)


def dot_axes(plan: LayerPlan, x: jax.Array, dimension_numbers) -> list[int]:
    """The input axes of a ``dot_general(x, kernel, dimension_numbers)`` that ``s`` scales."""
    (lc, rc), _ = dimension_numbers
    nd = len(plan.kernel_shape)
    pair = {int(r) % nd: int(c) % x.ndim for c, r in zip(lc, rc, strict=True)}
    return [pair[a] for a in sorted(pair)]


def einsum_axes(plan: LayerPlan, subscripts: str, x: jax.Array) -> list[int]:
    """The input axes of an ``einsum(subscripts, x, kernel)`` that ``s`` scales."""
    spec = parse_einsum(expand_ellipsis(subscripts, x.ndim, len(plan.kernel_shape)))
    return [spec.lhs.index(spec.rhs[a]) for a in spec.rhs_contracting]


def conv_axes(x: jax.Array, kernel_shape, dimension_numbers) -> list[int]:
    """The input-channel axis of a ``conv_general_dilated(x, kernel, ...)``."""
    dn = lax.conv_dimension_numbers(x.shape, tuple(kernel_shape), dimension_numbers)
    return [dn.lhs_spec[1]]


@dataclasses.dataclass(frozen=True)
class ScaledInput:
    """A product hook that divides its input by the active input scale, then runs ``op`` (the
    layer's quantized hook: :class:`DotOp`, :class:`EinsumOp` or :class:`ConvOp`)."""

    op: DotOp | EinsumOp | ConvOp

    @property
    def plan(self) -> LayerPlan:
        return self.op.plan

    def __call__(self, *args, **kwargs):
        s = _current(self.plan)
        if isinstance(self.op, EinsumOp):
            subscripts, x, rhs, *rest = args
            x = divide(self.plan, x, s, einsum_axes(self.plan, subscripts, x))
            return self.op(subscripts, x, rhs, *rest, **kwargs)
        x, rhs, *rest = args
        if isinstance(self.op, ConvOp):
            dn = kwargs.get("dimension_numbers", rest[4] if len(rest) > 4 else None)
            axes = conv_axes(x, self.plan.kernel_shape, dn)
        else:
            dn = kwargs["dimension_numbers"] if "dimension_numbers" in kwargs else rest[0]
            axes = dot_axes(self.plan, x, dn)
        return self.op(divide(self.plan, x, s, axes), rhs, *rest, **kwargs)


__all__ = [
    "INPUT_SCALE",
    "ScaledInput",
    "conv_axes",
    "divide",
    "dot_axes",
    "einsum_axes",
    "input_scale",
    "input_scale_shape",
]
