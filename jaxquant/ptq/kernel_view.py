"""Any quantized layer's kernel as the matrix GPTQ works on, and its inputs as matching rows.

Lingo: a layer's product contracts some kernel axes with axes of its input ``x``. The **matrix
view** of the kernel puts the contracted axes first (the rows, ``d_in``) and the others after
(the columns, ``d_out``): ``w2 [d_in, d_out]``. The **rows** of an input are ``x2 [tokens,
d_in]`` in the same order, so the layer computes ``x2 @ w2`` (up to a reshape) and GPTQ's
Hessian is ``x2^T x2``.

* Dot / einsum layers (``Dense``, ``DenseGeneral``, ``Einsum``; N-D kernels): rows are the
  contracted kernel axes (:func:`row_axes`: the plan's ``contracting_axes`` order, or ascending
  when grouped); columns the other kernel axes, ascending. A group of ``g`` rows is a group of
  the plan: the plan groups ``g`` consecutive elements of its innermost contracting axis (the
  last row axis), so with ``g`` dividing that axis, ``g`` consecutive rows of the row-major
  flattening are one group (an attention output kernel ``[heads, head_dim, d_model]`` is the
  matrix ``[heads * head_dim, d_model]`` and its scale ``[heads, head_dim / g, d_model]`` the
  matrix scale ``[heads * head_dim / g, d_model]``).
* Conv (kernel ``[*window, in / feature_groups, out]``): rows are ``(in, *window)``, the feature
  order of :func:`jax.lax.conv_general_dilated_patches` (im2col), so ``g`` input channels are
  ``g * window`` consecutive rows and the plan's groups (``g`` channels across the whole window)
  are groups of the matrix. With ``feature_groups > 1`` the product is block diagonal: feature
  group ``j`` maps its own ``in / feature_groups`` channels to output columns
  ``[j * out / feature_groups, (j + 1) * out / feature_groups)``.

The scale of a plan's kernel (:meth:`~jaxquant.nn.layer_quant.LayerPlan.weight_spec`) maps to
the matrix's ``[d_in / group or 1, d_out]`` scale by the same transpose and reshape.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.core.einsum_spec import parse_einsum
from jaxquant.core.spec import QuantSpec, resolve_layout
from jaxquant.nn.layer_quant import LayerPlan, Op, expand_ellipsis


class LayerCallError(ValueError):
    """A quantized layer was called in a way the matrix view does not cover."""


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """How one plan's kernel is a matrix.

    Attributes:
      perm: kernel axes in matrix order (rows' axes first).
      n_rows_axes: how many of ``perm`` are rows.
      d_in, d_out: the matrix shape.
      group_size: rows per group of the plan's weight spec (None: one scale per column).
    """

    perm: tuple[int, ...]
    n_rows_axes: int
    d_in: int
    d_out: int
    group_size: int | None


def matrix_view(plan: LayerPlan) -> MatrixView:
    """The :class:`MatrixView` of a dot, einsum or conv plan."""
    shape = plan.kernel_shape
    nd = len(shape)
    if plan.op is Op.CONV:
        perm = (nd - 2, *range(nd - 2), nd - 1)
        n_rows = nd - 1
        window = math.prod(shape[:-2])
        group = None if plan.group_size is None else plan.group_size * window
    elif plan.op in (Op.DOT, Op.EINSUM):
        rows = row_axes(plan)
        perm = (*rows, *(a for a in range(nd) if a not in rows))
        n_rows = len(rows)
        group = plan.group_size
    else:
        raise ValueError(f"{plan.path}: a {plan.op.value} layer has no matrix view.")
    d_in = math.prod(shape[a] for a in perm[:n_rows])
    d_out = math.prod(shape[a] for a in perm[n_rows:])
    return MatrixView(perm, n_rows, d_in, d_out, group)


def row_axes(plan: LayerPlan) -> tuple[int, ...]:
    """The kernel axes of a dot / einsum plan's matrix rows, outermost first.

    The plan's ``contracting_axes`` order; ascending when the plan has groups, so that the
    grouped (innermost, ``max``) contracting axis is last and a group is consecutive rows.
    """
    axes = tuple(plan.contracting_axes)
    return tuple(sorted(axes)) if plan.group_size is not None else axes


def to_matrix(plan: LayerPlan, kernel: jax.Array) -> jax.Array:
    """``kernel`` (``plan.kernel_shape``) as ``[d_in, d_out]``."""
    v = matrix_view(plan)
    return jnp.transpose(jnp.asarray(kernel), v.perm).reshape(v.d_in, v.d_out)


def from_matrix(plan: LayerPlan, w2: jax.Array) -> jax.Array:
    """The inverse of :func:`to_matrix`: ``[d_in, d_out]`` back to ``plan.kernel_shape``."""
    v = matrix_view(plan)
    shape = plan.kernel_shape
    w = jnp.reshape(w2, tuple(shape[a] for a in v.perm))
    return jnp.transpose(w, np.argsort(v.perm))


def matrix_spec(plan: LayerPlan) -> QuantSpec:
    """The weight spec of the matrix (no axes; group size in rows)."""
    rhs = plan.config.rhs
    if rhs is None:
        raise ValueError(f"{plan.path}: the plan keeps its weights float.")
    return dataclasses.replace(rhs, group_size=matrix_view(plan).group_size)


def scale_to_kernel(plan: LayerPlan, s2: jax.Array | None) -> jax.Array | None:
    """A matrix scale (or zero point) ``[d_in / group or 1, d_out]`` in the kernel's layout
    (``resolve_layout(plan.weight_spec(), plan.kernel_shape).scale_shape``)."""
    if s2 is None:
        return None
    v = matrix_view(plan)
    full = resolve_layout(plan.weight_spec(), plan.kernel_shape).scale_shape
    permuted = tuple(full[a] for a in v.perm)
    rows = math.prod(permuted[: v.n_rows_axes])
    if tuple(s2.shape) != (rows, v.d_out):
        raise ValueError(f"{plan.path}: matrix scale {tuple(s2.shape)} != {(rows, v.d_out)}.")
    return jnp.transpose(jnp.reshape(s2, permuted), np.argsort(v.perm))


# --- inputs as rows ----------------------------------------------------------------------------


def _rows(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``x`` with ``axes`` (in this order) last, flattened to ``[tokens, prod(axes' sizes)]``."""
    x = jnp.asarray(x, jnp.float32)
    rest = tuple(a for a in range(x.ndim) if a not in axes)
    d = math.prod(x.shape[a] for a in axes)
    return jnp.transpose(x, (*rest, *axes)).reshape(-1, d)


def dot_rows(plan: LayerPlan, lhs: jax.Array, dimension_numbers) -> jax.Array:
    """Rows ``[tokens, d_in]`` of a ``dot_general(lhs, kernel, dimension_numbers)`` input."""
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb:
        raise LayerCallError(
            f"{plan.path}: this {plan.layer} has batch axes in its dot_general, so its kernel is "
            f"not one matrix; GPTQ cannot quantize it. Keep it float (QuantRule(r'^{plan.path}$', "
            "None) first in the rules) or use method='rtn'."
        )
    pair = {int(r) % len(plan.kernel_shape): int(c) % lhs.ndim for c, r in zip(lc, rc, strict=True)}
    return _rows(lhs, tuple(pair[a] for a in row_axes(plan)))


def einsum_rows(plan: LayerPlan, subscripts: str, lhs: jax.Array) -> jax.Array:
    """Rows ``[tokens, d_in]`` of an ``einsum(subscripts, lhs, kernel)`` input."""
    spec = parse_einsum(expand_ellipsis(subscripts, lhs.ndim, len(plan.kernel_shape)))
    if any(c in spec.rhs for c in spec.batch):
        raise LayerCallError(
            f"{plan.path}: einsum {subscripts!r} has kernel axes that are batch axes "
            f"({''.join(spec.batch)}), so its kernel is not one matrix; GPTQ cannot quantize "
            f"it. Keep it float (QuantRule(r'^{plan.path}$', None) first) or use method='rtn'."
        )
    return _rows(lhs, tuple(spec.lhs.index(spec.rhs[a]) for a in row_axes(plan)))


def conv_rows(
    plan: LayerPlan,
    lhs: jax.Array,
    kernel_shape,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
) -> jax.Array:
    """im2col rows of a ``conv_general_dilated(lhs, kernel, ...)`` input.

    Returns:
      ``[feature_group_count, tokens, d_in]``: for each feature group, the patches of its input
      channels, ``(in, *window)`` flattened, one row per output position.
    """
    nd = len(kernel_shape)
    dn = lax.conv_dimension_numbers(lhs.shape, tuple(kernel_shape), dimension_numbers)
    if tuple(dn.rhs_spec) != (nd - 1, nd - 2, *range(nd - 2)):
        raise LayerCallError(
            f"{plan.path}: the conv kernel layout {dn.rhs_spec} is not Flax's [*window, in, out]."
        )
    if batch_group_count != 1:
        raise LayerCallError(f"{plan.path}: batch_group_count > 1 is not supported by GPTQ.")
    patches = lax.conv_general_dilated_patches(
        lhs,
        tuple(kernel_shape[:-2]),
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dn,
        precision=lax.Precision.HIGHEST,
    )
    x2 = _rows(patches, (dn.out_spec[1],))
    return x2.reshape(x2.shape[0], feature_group_count, -1).transpose(1, 0, 2)


# --- per-input-channel scales (AWQ, SmoothQuant) -----------------------------------------------


def _channel_layout(plan: LayerPlan) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``(row_shape, perm, taps)``: the rows as ``row_shape`` (row axes' sizes), the permutation
    taking them to ascending kernel axes (the input scale's order), and the rows per channel
    (a conv's window; 1 for dot / einsum)."""
    if plan.op is Op.CONV:
        return (plan.kernel_shape[-2],), (0,), math.prod(plan.kernel_shape[:-2])
    rows = row_axes(plan)
    order = sorted(rows)
    return tuple(plan.kernel_shape[a] for a in rows), tuple(rows.index(a) for a in order), 1


def channel_stat(plan: LayerPlan, v: jax.Array, reduce: str) -> jax.Array:
    """A per-row statistic ``[d_in]`` of the matrix view as a per-input-channel one, flat
    ``[prod(input_scale_shape)]`` in the input scale's order (ascending kernel axes): a dot /
    einsum's rows are its channels (reordered); a conv's ``window`` rows of one input channel
    are reduced (``reduce``: ``"mean"`` or ``"max"``)."""
    shape, perm, taps = _channel_layout(plan)
    v = jnp.asarray(v).reshape(-1, taps)
    v = v.mean(axis=1) if reduce == "mean" else v.max(axis=1)
    return jnp.transpose(v.reshape(shape), perm).reshape(-1)


def channel_rows(plan: LayerPlan, s: jax.Array) -> jax.Array:
    """An input scale (``input_scale_shape`` or flat) as the matrix view's rows ``[d_in]``: the
    inverse reorder of :func:`channel_stat`, a conv's channel repeated over its window."""
    shape, perm, taps = _channel_layout(plan)
    s = jnp.reshape(s, tuple(shape[p] for p in perm))
    return jnp.repeat(jnp.transpose(s, np.argsort(perm)).reshape(-1), taps)
