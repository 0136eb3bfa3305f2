"""Per-layer quantization plans and the hooks that run stock Flax layers quantized.

Shared by :func:`~jaxquant.nn.any_model.quantize_model` for linen and NNX. A
:class:`LayerPlan` is what one matched layer does: its op (a ``dot_general``, an ``einsum`` or a
``conv_general_dilated``), its kernel shape, the kernel axes it contracts and the layer's
:class:`~jaxquant.core.dot_config.DotGeneralConfig` with the group size adapted to it.

Lingo: the **kernel** is the layer's weight (the rhs of its product). A dot layer contracts the
kernel axes of its dimension numbers; a conv (kernel ``[*spatial, in / feature_groups, out]``)
contracts every axis but the last. Groups of a dot layer tile its innermost contracting axis
(``max(contracting_axes)``: ``g`` consecutive elements of the contraction flattened row-major;
the other contracting axes keep their own scale, so an attention output kernel ``[heads,
head_dim, d_model]`` gets a scale ``[heads, head_dim / g, d_model]``); groups of a conv tile the input-channel axis (a group spans the whole window), so a conv's
scale has shape ``[1, ..., 1, in // g, out]``.

The hooks are frozen dataclasses (hashable by value) with the signatures that Flax passes to
``dot_general``, ``einsum_op`` and ``conv_general_dilated``; each accepts a float kernel
(training: the kernel is quantized on the fly, straight-through gradient) or a served
:class:`~jaxquant.core.QArray` kernel (used as is).
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.core import QArray, QKind, QuantSpec, fake_quant, gather_rows, get_qtype, quantize
from jaxquant.core.dot_config import DotGeneralConfig
from jaxquant.core.dot_general import dot_general, einsum, operand_spec

SUPPORTED = (
    "Dense, DenseGeneral, Einsum, Conv, Embed, MultiHeadDotProductAttention (linen); Linear, "
    "LinearGeneral, Einsum, Conv, Embed, MultiHeadAttention (NNX)"
)


def unsupported_error(path: str, layer: str, rule) -> ValueError:
    """The error for a layer that ``rule`` matches but that cannot be quantized."""
    return ValueError(
        f"{path or '<root>'}: rule {rule.pattern!r} matches this {layer}, which quantize_model "
        f"cannot quantize (supported: {SUPPORTED}). Put QuantRule(r'^{path}$', None) "
        "first in the rules to keep it float."
    )


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def expand_ellipsis(subscripts: str, lhs_ndim: int, rhs_ndim: int) -> str:
    """``subscripts`` with ``...`` spelled out in letters it does not use.

    ``"...qhd,...khd->...hqk"`` on rank-4 operands gives ``"Aqhd,Akhd->Ahqk"``; an operand
    without ``...`` (a kernel: ``"...d,df->...f"``) is left as written.

    Raises:
      ValueError: when both operands have ``...`` over different numbers of axes (broadcasting
        is not supported).
    """
    eq = subscripts.replace(" ", "")
    if "..." not in eq:
        return eq
    ins, out = eq.split("->")
    a, b = ins.split(",")
    counts = {
        n - len(t.replace("...", "")) for t, n in ((a, lhs_ndim), (b, rhs_ndim)) if "..." in t
    }
    if len(counts) != 1 or min(counts) < 0:
        raise ValueError(
            f"einsum {subscripts!r} on operands of rank {lhs_ndim} and {rhs_ndim}: '...' must "
            "stand for the same number of axes in both (no broadcasting)."
        )
    fill = "".join([c for c in _LETTERS if c not in eq][: counts.pop()])
    return ",".join(t.replace("...", fill) for t in (a, b)) + "->" + out.replace("...", fill)


class Op(enum.Enum):
    """The product a layer computes with its kernel."""

    DOT = "dot_general"
    EINSUM = "einsum"
    CONV = "conv_general_dilated"
    EMBED = "embed"  # a table lookup (rows dequantized) and ``attend`` (a dot_general)
    ATTENTION = "attention"  # the q.k and attn.v einsums inside a multi-head attention


def adapt_group(n: int, group_size: int) -> int:
    """The largest divisor of ``n`` that is ``<= group_size`` (``n`` itself when smaller)."""
    g = min(int(group_size), int(n))
    while n % g:
        g -= 1
    return g


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """How one layer is quantized.

    Attributes:
      path: the ``'/'``-joined module path the rules matched.
      layer: the layer's class name (for reports and errors).
      op: the product it computes.
      kernel_shape: the float kernel's shape.
      contracting_axes: the kernel axes its product contracts.
      config: the layer's config; ``config.rhs.group_size`` is the group size used.
      requested_group_size: the rule's group size before adaptation (None: no groups).
      weight_name: the name of the layer's weight param (``"kernel"``, ``"embedding"``).
    """

    path: str
    layer: str
    op: Op
    kernel_shape: tuple[int, ...]
    contracting_axes: tuple[int, ...]
    config: DotGeneralConfig
    requested_group_size: int | None = None
    weight_name: str = "kernel"

    @property
    def group_size(self) -> int | None:
        """The group size actually used (None: a scale per output channel)."""
        return None if self.config.rhs is None else self.config.rhs.group_size

    def weight_spec(self) -> QuantSpec | None:
        """The full spec of the kernel (axes resolved), or None when weights stay float.

        Dot layers: :func:`~jaxquant.core.dot_general.operand_spec` of the contracting axes
        (what ``quantize_operand`` uses); conv: a scale per output channel (and per group of
        input channels).
        """
        rhs = self.config.rhs
        if rhs is None:
            return None
        nd = len(self.kernel_shape)
        if self.op is Op.CONV:
            return dataclasses.replace(
                rhs, channel_axes=(nd - 1,), group_axis=nd - 2 if rhs.group_size else None
            )
        return operand_spec(rhs, nd, self.contracting_axes)

    def quantize_kernel(
        self, kernel: jax.Array, *, scale: jax.Array | None = None, zero_point=None
    ) -> jax.Array | QArray:
        """The serving kernel: a packed :class:`QArray` (the float kernel if weights stay float).

        Exactly what the training forward computes with, so serving reproduces it.

        Args:
          kernel: the float kernel, :attr:`kernel_shape`.
          scale: None (round to nearest: the scale from the kernel), or a precomputed scale of
            :meth:`weight_spec`'s layout (GPTQ's, with ``kernel`` already on its grid).
          zero_point: with ``scale``, for asymmetric formats.
        """
        if tuple(np.shape(kernel)) != self.kernel_shape:
            raise ValueError(
                f"{self.path}: kernel has shape {tuple(np.shape(kernel))}, the quantization plan "
                f"expects {self.kernel_shape}. Convert the params this model was built for."
            )
        if self.config.rhs is None:
            return kernel
        kernel = jnp.asarray(kernel)
        return quantize(kernel, self.weight_spec(), scale=scale, zero_point=zero_point)

    def to_dict(self) -> dict:
        """A JSON-safe summary (what a saved model is checked against on restore)."""
        return {
            "layer": self.layer,
            "op": self.op.value,
            "kernel_shape": list(self.kernel_shape),
            "contracting_axes": list(self.contracting_axes),
            "config": self.config.to_dict(),
            "requested_group_size": self.requested_group_size,
            "weight_name": self.weight_name,
        }

    def describe(self) -> str:
        rhs = self.config.rhs
        w = "float" if rhs is None else rhs.qtype
        a = "float" if self.config.lhs is None else self.config.lhs.qtype
        g = ""
        if self.requested_group_size is not None:
            g = f", group {self.group_size} (asked {self.requested_group_size})"
            if self.op is not Op.CONV and len(self.contracting_axes) > 1:
                g += (f" along kernel axis {max(self.contracting_axes)} of contracting axes "
                      f"{self.contracting_axes}")
        return f"{self.path or '<root>'}: {self.layer} ({self.op.value}) w={w} a={a}{g}"


def make_plan(
    path: str,
    layer: str,
    op: Op,
    kernel_shape,
    contracting_axes,
    config: DotGeneralConfig,
) -> LayerPlan:
    """A :class:`LayerPlan` with the group size adapted to the layer.

    The group size is adapted to a divisor of the grouped axis (the innermost contracting axis
    of a dot layer, the input-channel axis of a conv): :func:`adapt_group`.

    Raises:
      ValueError: naming ``path``, when the config cannot apply to this layer (groups on a
        layer that contracts no kernel axis, grouped or backward-quantized conv activations).
    """
    kernel_shape = tuple(int(n) for n in kernel_shape)
    contracting_axes = tuple(int(a) % len(kernel_shape) for a in contracting_axes)
    rhs = config.rhs
    requested = None if rhs is None else rhs.group_size
    if requested is not None:
        if op is Op.CONV:
            n = kernel_shape[-2]
        elif not contracting_axes:
            raise ValueError(
                f"{path}: the rule asks for group_size={requested}, but this {layer} contracts "
                f"no axis of its kernel {kernel_shape}. Put QuantRule(r'^{path}$', <config "
                "without group_size>) before the rule that matched."
            )
        else:  # groups tile the innermost contracting axis (operand_spec)
            n = kernel_shape[max(contracting_axes)]
        config = dataclasses.replace(
            config, rhs=dataclasses.replace(rhs, group_size=adapt_group(n, requested))
        )
    if op is Op.CONV:
        if config.lhs is not None and config.lhs.group_size is not None:
            raise ValueError(
                f"{path}: a {layer} quantizes its activations with one scale per example; the "
                "rule's activation group_size is not supported for convolutions. Use a config "
                "without lhs.group_size for this path."
            )
        if config.quantizes_backward:
            raise ValueError(
                f"{path}: quantized backward products (dlhs / drhs) are not supported for "
                f"{layer} yet. Use a forward-only config (w8a8(), weight_only()) for this path."
            )
    return LayerPlan(
        path=path,
        layer=layer,
        op=op,
        kernel_shape=kernel_shape,
        contracting_axes=contracting_axes,
        config=config,
        requested_group_size=requested,
    )


def promote_keep_qarray(*args, dtype=None, inexact=True):
    """Flax's ``promote_dtype`` that lets a QArray kernel through (its dequantize dtype set).

    Accepts both call styles: linen's ``promote(x, kernel, bias, dtype=...)`` (returns a list)
    and NNX's ``promote((x, kernel, bias), dtype=...)`` (returns a tuple).
    """
    del inexact
    if len(args) == 1 and isinstance(args[0], tuple):
        return tuple(promote_keep_qarray(*args[0], dtype=dtype))
    floats = [a for a in args if a is not None and not isinstance(a, QArray)]
    qs = [a.dtype for a in args if isinstance(a, QArray)]
    if dtype is None:
        dtype = jnp.result_type(*floats, *qs)
    out = []
    for a in args:
        if a is None:
            out.append(None)
        elif isinstance(a, QArray):
            out.append(dataclasses.replace(a, dtype=np.dtype(dtype)))
        else:
            out.append(jnp.asarray(a, dtype))
    return out


@dataclasses.dataclass(frozen=True)
class DotOp:
    """A ``dot_general`` hook (``nn.Dense(dot_general=...)``, ``nnx.Linear.dot_general``)."""

    plan: LayerPlan

    def __call__(
        self,
        lhs,
        rhs,
        dimension_numbers,
        precision=None,
        preferred_element_type=None,
        *,
        out_sharding=None,
    ):
        return dot_general(
            lhs,
            rhs,
            dimension_numbers,
            precision,
            preferred_element_type,
            config=self.plan.config,
            out_sharding=out_sharding,
        )


@dataclasses.dataclass(frozen=True)
class EinsumOp:
    """An ``einsum_op`` hook (``nnx.Einsum``; linen's Einsum is run by the interceptor)."""

    plan: LayerPlan

    def __call__(
        self,
        subscripts,
        lhs,
        rhs,
        *,
        precision=None,
        preferred_element_type=None,
        out_sharding=None,
        **unused,
    ):
        return einsum(
            expand_ellipsis(subscripts, jnp.ndim(lhs), jnp.ndim(rhs)),
            lhs,
            rhs,
            config=self.plan.config,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )


@dataclasses.dataclass(frozen=True)
class ConvOp:
    """A ``conv_general_dilated`` hook: quantized convolution.

    Weights: a scale per output channel (and per group of input channels when the rule has a
    group size). Activations (when the config has ``lhs``): one dynamic scale per example.
    Training fake-quantizes both (straight-through gradient). Serving takes the QArray kernel;
    with symmetric int (<= 8 bit) operands and no weight groups the product runs on the integer
    codes (int8 x int8 -> int32) and is scaled after.
    """

    plan: LayerPlan

    def __call__(
        self,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count=1,
        batch_group_count=1,
        precision=None,
        preferred_element_type=None,
        **unused,
    ):
        rshape = rhs.shape
        dn = lax.conv_dimension_numbers(lhs.shape, rshape, dimension_numbers)
        if dn.rhs_spec[0] != len(rshape) - 1:
            raise ValueError(
                f"{self.plan.path}: the conv kernel's output-feature axis is {dn.rhs_spec[0]}; "
                "quantize_model expects Flax's layout with output features last."
            )
        conv = lambda x, w, **kw: lax.conv_general_dilated(  # noqa: E731
            x,
            w,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            **kw,
        )
        cfg = self.plan.config
        aspec = None
        if cfg.lhs is not None:
            aspec = dataclasses.replace(cfg.lhs, channel_axes=(dn.lhs_spec[0],))
        if isinstance(rhs, QArray):
            return self._serve(lhs, rhs, aspec, dn, conv, preferred_element_type)
        x = lhs if aspec is None else fake_quant(lhs, aspec)
        w = rhs if cfg.rhs is None else fake_quant(rhs, self.plan.weight_spec())
        return conv(x, w, preferred_element_type=preferred_element_type)

    def _serve(self, lhs, q: QArray, aspec, dn, conv, preferred_element_type):
        dtype = q.dtype
        int_ok = (
            aspec is not None
            and self.plan.config.int_dot
            and q.group_size is None
            and q.zero_point is None
            and aspec.symmetric
            and q.bits <= 8
            and aspec.bits <= 8
            and get_qtype(q.qtype).kind is QKind.INT
            and aspec.qt.kind is QKind.INT
        )
        if not int_ok:
            x = lhs if aspec is None else fake_quant(lhs, aspec)
            return conv(x, q.dequantize(dtype), preferred_element_type=preferred_element_type)
        xq = quantize(lhs, aspec, pack=False)
        acc = conv(
            xq.codes().astype(jnp.int8),
            q.codes().astype(jnp.int8),
            preferred_element_type=jnp.int32,
        )
        out_nd = acc.ndim
        sx_shape = [1] * out_nd
        sx_shape[dn.out_spec[0]] = lhs.shape[dn.lhs_spec[0]]
        sw_shape = [1] * out_nd
        sw_shape[dn.out_spec[1]] = q.shape[-1]
        sx = jnp.reshape(xq.scale, sx_shape)
        sw = jnp.reshape(q.scale, sw_shape)
        out_dtype = preferred_element_type or dtype
        return (acc.astype(jnp.float32) * sx * sw).astype(out_dtype)


# --- embedding tables --------------------------------------------------------------------------
#
# A table ``[vocab, features]`` is quantized with a scale per row (and per group of features):
# the spec ``attend`` uses for it as the rhs of ``query . table^T`` (contracting ``features``).
# A lookup gathers the rows' codes and scales (``gather_rows``) and dequantizes only them; in
# training the gathered float rows are fake-quantized with the same per-row spec, which is
# exactly the rows of the fake-quantized table (a row's scale depends on that row only).


def embed_plan(path: str, layer: str, num_embeddings: int, features: int, config) -> LayerPlan:
    """The plan of an embedding table ``[num_embeddings, features]`` (groups tile features)."""
    plan = make_plan(path, layer, Op.DOT, (num_embeddings, features), (1,), config)
    return dataclasses.replace(plan, op=Op.EMBED, weight_name="embedding")


def embed_lookup(plan: LayerPlan, table, idx, dtype) -> jax.Array:
    """Rows ``idx`` of the table, ``[*idx.shape, features]`` in ``dtype``.

    Args:
      plan: the table's plan.
      table: the float table (training: the rows are fake-quantized, straight-through gradient
        to the table) or its served QArray.
      idx: int indices.
      dtype: the output dtype (None: the table's).
    """
    idx = jnp.asarray(idx)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"{plan.path}: embedding input must be integers, got {idx.dtype}.")
    if isinstance(table, QArray):
        _check_served(plan, table)
        return gather_rows(table, idx).dequantize(dtype or table.dtype)
    rows = jnp.take(table, idx, axis=0)
    if plan.config.rhs is not None:
        rows = fake_quant(rows, operand_spec(plan.config.rhs, rows.ndim, (rows.ndim - 1,)))
    return rows if dtype is None else rows.astype(dtype)


def embed_attend(plan: LayerPlan, table, query, dtype) -> jax.Array:
    """``query . table^T``: ``[..., features] -> [..., num_embeddings]``, quantized per the plan
    (the query by the config's lhs, the table per row)."""
    if isinstance(table, QArray):
        _check_served(plan, table)
        dtype = dtype or jnp.result_type(query.dtype, table.dtype)
        table = dataclasses.replace(table, dtype=np.dtype(dtype))
    else:
        dtype = dtype or jnp.result_type(query.dtype, table.dtype)
        table = jnp.asarray(table, dtype)
    query = jnp.asarray(query, dtype)
    dn = (((query.ndim - 1,), (1,)), ((), ()))
    return dot_general(query, table, dn, config=plan.config)


def _check_served(plan: LayerPlan, q: QArray) -> None:
    if tuple(q.shape) != plan.kernel_shape:
        raise ValueError(
            f"{plan.path}: the served {plan.weight_name} has shape {tuple(q.shape)}, the layer "
            f"expects {plan.kernel_shape}."
        )
