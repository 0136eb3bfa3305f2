"""A quantized ``dot_general``: a drop-in for ``lax.dot_general`` with a ``config``.

Lingo: ``dimension_numbers = ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
The output's axes are ``[batch..., lhs_free..., rhs_free...]``, as in ``lax.dot_general``.
Each quantized operand has one scale per index of its non-contracting (batch and free) axes,
or, with ``group_size``, one per group along its innermost contracting axis (and, when it
contracts over several axes, one per index of the other contracting axes: see
:func:`operand_spec`; such operands take the reference path).

Paths, fastest first:

* **tiled integer (W4A8)** (``config.tiling``; on XLA:CPU by default): int8 activations of at
  most 16 rows times a served, packed sub-byte weight: int8 products of weight tiles with int32
  sums per group (:mod:`jaxquant.core.w4a8`).
* **integer**: both operands symmetric ints (<= 8 bits): ``dot_general`` on the int8 codes
  with int32 accumulation, then one rescale by the outer product of the operands' scales.
  With groups along the contraction, the groups become a batch axis of the integer dot and
  the scaled partial products are summed (AQT's tiled dot_general).
* **fp8**: both operands fp8: a ``dot_general`` on the float8 values with f32 accumulation,
  then the same rescale.
* **tiled weight-only** (``config.tiling``, XLA:CPU by default): a float lhs of at most 16
  rows (decode) times a QArray weight: the weight is dequantized one cache-sized tile at a
  time inside a loop, so only its codes are read from memory (:mod:`jaxquant.core.tiled_dot`).
* **reference**: dequantize whatever is quantized, then a float ``lax.dot_general``. Used
  for the other weight-only products, for asymmetric operands, and as the definition the fast
  paths are tested against (:func:`dot_general_reference`).

Gradients: a ``custom_vjp``. Each backward product (``dlhs = g . rhs``, ``drhs = lhs . g``)
is itself a quantized ``dot_general`` when the config gives it a :class:`BackwardSpec`,
otherwise a float product of the dequantized operands (straight-through estimator).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.core.calibration import compute_scale
from jaxquant.core.dot_config import BackwardSpec, DotGeneralConfig
from jaxquant.core.einsum_spec import parse_einsum
from jaxquant.core.qarray import QArray, quantize
from jaxquant.core.qtypes import QKind, get_qtype
from jaxquant.core.spec import QuantSpec
from jaxquant.core.tiled_dot import MAX_TILED_ROWS, tile_rows, tiled_weight_dot, tiles_enabled
from jaxquant.core.w4a8 import tiled_int_dot
from jaxquant.errors import JaxquantError

# --- dimension numbers --------------------------------------------------------------------------


def _normalize_dn(dimension_numbers):
    (lc, rc), (lb, rb) = dimension_numbers
    return ((tuple(int(a) for a in lc), tuple(int(a) for a in rc)),
            (tuple(int(a) for a in lb), tuple(int(a) for a in rb)))


def _check_dn(lhs, rhs, dn) -> None:
    """Raises a ValueError (as ``lax.dot_general`` would, but naming the axis) for axes out of
    range or contracting/batch axes of different sizes."""
    (lc, rc), (lb, rb) = dn
    for name, x, axes in (("lhs", lhs, lc + lb), ("rhs", rhs, rc + rb)):
        ndim = len(x.shape)
        bad = [a for a in axes if not -ndim <= a < ndim]
        if bad:
            raise JaxquantError(
                f"dot_general: {name} axis {bad[0]} is out of range for a {name} of rank {ndim} "
                f"(shape {tuple(x.shape)}); dimension_numbers are ((lhs_contracting, "
                f"rhs_contracting), (lhs_batch, rhs_batch)) = {dn}."
            )
    for kind, la, ra in (("contracting", lc, rc), ("batch", lb, rb)):
        sizes = ([lhs.shape[a] for a in la], [rhs.shape[a] for a in ra])
        if sizes[0] != sizes[1]:
            raise JaxquantError(
                f"dot_general: lhs {kind} axes {la} have sizes {sizes[0]} but rhs {kind} axes "
                f"{ra} have sizes {sizes[1]}; they must match pairwise."
            )


def _free_axes(ndim: int, contracting, batch) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in contracting and a not in batch)


def operand_spec(spec: QuantSpec, ndim: int, contracting_axes) -> QuantSpec:
    """The full :class:`QuantSpec` of an operand with these contracting axes.

    Non-contracting axes keep their own scale. A ``group_size`` tiles the innermost contracting
    axis (the last of them in the operand's row-major layout, ``max(contracting_axes)``): a
    group is ``group_size`` consecutive elements of the contraction flattened row-major, as in
    the ``[prod(contracting sizes), ...]`` view of the operand. The other contracting axes then
    keep their own scale too (they are channel axes of the spec), so a kernel ``[heads,
    head_dim, d_model]`` contracting over ``(0, 1)`` in groups of ``g`` has a scale ``[heads,
    head_dim / g, d_model]``.

    Raises:
      ValueError: for ``group_size`` on an operand that contracts no axis. (A group size that
      does not divide the innermost contracting axis is refused when the operand is quantized.)
    """
    contracting = tuple(a % ndim for a in contracting_axes)
    channel = tuple(a for a in range(ndim) if a not in contracting)
    group_axis = None
    if spec.group_size is not None:
        if not contracting:
            raise ValueError(
                f"group_size={spec.group_size} tiles a contracting axis; this operand contracts "
                "none. Drop group_size for it."
            )
        group_axis = max(contracting)
        if len(contracting) > 1:
            channel = tuple(a for a in range(ndim) if a != group_axis)
    return dataclasses.replace(spec, channel_axes=channel, group_axis=group_axis)


def quantize_operand(
    x: jax.Array, spec: QuantSpec, contracting_axes, *, key=None, pack: bool = True
) -> QArray:
    """Quantizes ``x`` exactly as :func:`dot_general` quantizes an operand.

    Use it to convert weights for serving: ``dot_general(x, quantize_operand(w, cfg.rhs, (0,)),
    dn, config=cfg)`` equals ``dot_general(x, w, dn, config=cfg)``.

    Args:
      x: float operand.
      spec: the operand's spec from a :class:`DotGeneralConfig` (no axes set).
      contracting_axes: the axes of ``x`` that the dot contracts.
      key: PRNG key for stochastic rounding.
      pack: pack sub-byte codes (True for storage; the dot unpacks them).

    Returns:
      A :class:`QArray` with ``x``'s shape.
    """
    return quantize(x, operand_spec(spec, x.ndim, contracting_axes), key, pack=pack)


# --- forward products ---------------------------------------------------------------------------


def _float_dtype(*operands):
    # A QArray's dtype is the dtype it dequantizes to.
    dts = [o.dtype for o in operands if jnp.issubdtype(o.dtype, jnp.floating)]
    return jnp.result_type(*dts) if dts else jnp.float32


def _as_float(x, dtype):
    return x.dequantize(dtype) if isinstance(x, QArray) else x


def _factoring(q: QArray, contracting) -> tuple[str, int | None, int | None] | None:
    """How ``q``'s scale factors out of a contraction: ``("row", None, None)`` (constant over the
    contraction), ``("group", axis, size)``, or None (it can't: use the reference path)."""
    if q.zero_point is not None:
        return None
    s = q.scale.shape
    if all(s[a] == 1 for a in contracting):
        return ("row", None, None)
    if (
        q.group_axis in contracting
        and len(contracting) == 1
        and s[q.group_axis] * q.group_size == q.shape[q.group_axis]
    ):
        return ("group", q.group_axis, q.group_size)
    return None


def _scale_to_output(scale, contracting, batch, free, n_other_free, lhs_side: bool, group_axis):
    """Moves an operand's scale ``[operand rank]`` into the output layout
    ``[groups?, batch..., lhs_free..., rhs_free...]``."""
    lead = (group_axis,) if group_axis is not None else ()
    rest = tuple(a for a in contracting if a != group_axis)
    s = jnp.transpose(scale, lead + tuple(batch) + tuple(free) + rest)
    s = s.reshape(s.shape[: len(lead) + len(batch) + len(free)])
    if group_axis is None:
        s = s[None]  # a group axis of 1
    nb = len(batch)
    if lhs_side:
        return s.reshape(s.shape + (1,) * n_other_free)
    return s.reshape(s.shape[: 1 + nb] + (1,) * n_other_free + s.shape[1 + nb :])


def _codes_dot(lcodes, rcodes, dn, acc, lfree):
    """``lax.dot_general`` of the codes. XLA:CPU's int8 product with a single lhs row is a slow
    path (about 20x slower than two rows for a ``[1, 576] x [49152, 576]^T`` head), so a lone
    row is padded to two and the padding row dropped."""
    (_, _), (lb, _) = dn
    single = lfree and not lb and all(lcodes.shape[a] == 1 for a in lfree)
    if not (single and acc == jnp.int32):
        return lax.dot_general(lcodes, rcodes, dn, preferred_element_type=acc)
    pad = [(0, 0)] * lcodes.ndim
    pad[lfree[0]] = (0, 1)
    y = lax.dot_general(jnp.pad(lcodes, pad), rcodes, dn, preferred_element_type=acc)
    return lax.slice_in_dim(y, 0, 1, axis=0)  # no batch axes: lhs_free[0] is output axis 0


def _scaled_codes_dot(lq: QArray, rq: QArray, dn, out_dtype, kind: QKind):
    """The integer / fp8 product with one rescale; None when the scales don't factor."""
    (lc, rc), (lb, rb) = dn
    fl, fr = _factoring(lq, lc), _factoring(rq, rc)
    if fl is None or fr is None:
        return None
    gsizes = {f[2] for f in (fl, fr) if f[0] == "group"}
    if len(gsizes) > 1:
        return None
    lcodes, rcodes = lq.codes(), rq.codes()
    lfree = _free_axes(lq.ndim, lc, lb)
    rfree = _free_axes(rq.ndim, rc, rb)
    acc = jnp.int32 if kind is QKind.INT else jnp.float32
    if gsizes:
        g = gsizes.pop()
        (cl,), (cr,) = lc, rc
        k = lq.shape[cl]
        # [..., K, ...] -> [..., K/g, g, ...]; the K/g axis becomes a leading batch axis.
        lcodes = lcodes.reshape(lcodes.shape[:cl] + (k // g, g) + lcodes.shape[cl + 1 :])
        rcodes = rcodes.reshape(rcodes.shape[:cr] + (k // g, g) + rcodes.shape[cr + 1 :])
        shift_l = lambda a: a + 1 if a > cl else a
        shift_r = lambda a: a + 1 if a > cr else a
        gdn = (
            ((cl + 1,), (cr + 1,)),
            ((cl,) + tuple(shift_l(a) for a in lb), (cr,) + tuple(shift_r(a) for a in rb)),
        )
        y = lax.dot_general(lcodes, rcodes, gdn, preferred_element_type=acc)
        sl = _scale_to_output(lq.scale if fl[0] == "group" else jnp.broadcast_to(
            lq.scale, lq.scale.shape[:cl] + (k // g,) + lq.scale.shape[cl + 1 :]),
            lc, lb, lfree, len(rfree), True, cl)
        sr = _scale_to_output(rq.scale if fr[0] == "group" else jnp.broadcast_to(
            rq.scale, rq.scale.shape[:cr] + (k // g,) + rq.scale.shape[cr + 1 :]),
            rc, rb, rfree, len(lfree), False, cr)
        return jnp.sum(y.astype(jnp.float32) * sl * sr, axis=0).astype(out_dtype)
    y = _codes_dot(lcodes, rcodes, dn, acc, lfree)
    sl = _scale_to_output(lq.scale, lc, lb, lfree, len(rfree), True, None)[0]
    sr = _scale_to_output(rq.scale, rc, rb, rfree, len(lfree), False, None)[0]
    return (y.astype(jnp.float32) * (sl * sr)).astype(out_dtype)


def _quantize_dynamic(x, spec: QuantSpec, contracting_axes, key) -> QArray:
    """:func:`quantize_operand` (unpacked) for the dynamic path, with the same result.

    Symmetric absmax without groups (W8A8, fp8) takes its range from one reduce of ``|x|`` over
    the contracting axes, instead of the general calibration's separate min and max reduces:
    ``max(|min x|, |max x|) == max |x|`` exactly, so the scale and codes are identical, at one
    pass over ``x`` less.
    """
    full = operand_spec(spec, x.ndim, contracting_axes)
    if spec.symmetric and spec.calibration == "absmax" and spec.group_size is None:
        axes = tuple(a % x.ndim for a in contracting_axes)
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True)
        scale, _ = compute_scale(-amax, amax, full)
        return quantize(x, full, key, scale=scale, pack=False)
    return quantize(x, full, key, pack=False)


def _quantized_operands(lhs, rhs, dn, lspec, rspec, key):
    (lc, rc), _ = dn
    kl = kr = None
    if key is not None:
        kl, kr = jax.random.split(key)
    if not isinstance(lhs, QArray) and lspec is not None:
        lhs = _quantize_dynamic(lhs, lspec, lc, kl)
    if not isinstance(rhs, QArray) and rspec is not None:
        rhs = _quantize_dynamic(rhs, rspec, rc, kr)
    return lhs, rhs


def _forward(lhs, rhs, dn, precision, preferred_element_type, lspec, rspec, int_dot, key,
             tiling="auto"):
    """Quantized forward product (no custom gradient). ``tiling`` is the config's mode of the
    tiled decode kernels; ``"never"`` keeps the untiled products (the reference)."""
    out_dtype = preferred_element_type or _float_dtype(lhs, rhs)
    lq, rq = _quantized_operands(lhs, rhs, dn, lspec, rspec, key)
    if isinstance(lq, QArray) and isinstance(rq, QArray) and int_dot:
        kinds = {get_qtype(lq.qtype).kind, get_qtype(rq.qtype).kind}
        if kinds == {QKind.INT} and lq.bits <= 8 and rq.bits <= 8:
            if tiles_enabled(tiling):  # W4A8 for few rows: int8 products of weight tiles
                y = tiled_int_dot(lq, rq, dn, out_dtype, max_rows=MAX_TILED_ROWS,
                                  tile=tile_rows(rq) if rq.ndim == 2 else None)
                if y is not None:
                    return y
            y = _scaled_codes_dot(lq, rq, dn, out_dtype, QKind.INT)
            if y is not None:
                return y
        if kinds == {QKind.FLOAT}:
            y = _scaled_codes_dot(lq, rq, dn, out_dtype, QKind.FLOAT)
            if y is not None:
                return y
    ftype = _float_dtype(lhs, rhs)
    if isinstance(rq, QArray) and not isinstance(lq, QArray):
        y = tiled_weight_dot(lq, rq, dn, precision, preferred_element_type, ftype, tiling=tiling)
        if y is not None:
            return y
    return lax.dot_general(
        _as_float(lq, ftype), _as_float(rq, ftype), dn, precision=precision,
        preferred_element_type=preferred_element_type,
    )


def dot_general_reference(
    lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *, config=None
):
    """The definition: quantize per ``config``, dequantize, then a float ``lax.dot_general``.

    The fast paths of :func:`dot_general` agree with this up to float reassociation.
    """
    dn = _normalize_dn(dimension_numbers)
    if config is None:
        return lax.dot_general(_as_float(lhs, _float_dtype(lhs, rhs)),
                               _as_float(rhs, _float_dtype(lhs, rhs)), dn, precision=precision,
                               preferred_element_type=preferred_element_type)
    return _forward(lhs, rhs, dn, precision, preferred_element_type, config.lhs, config.rhs,
                    False, _derive_key(config, lhs, 0), tiling="never")


# --- backward -----------------------------------------------------------------------------------


def _grad_dims(dn, lhs_ndim, rhs_ndim):
    """Dimension numbers and output permutations of the two backward products.

    Returns ``(dlhs_dn, dlhs_perm, drhs_dn, drhs_perm)``: ``dlhs = transpose(dot_general(g, rhs,
    dlhs_dn), dlhs_perm)`` and ``drhs = transpose(dot_general(g, lhs, drhs_dn), drhs_perm)``.
    """
    (lc, rc), (lb, rb) = dn
    lfree, rfree = _free_axes(lhs_ndim, lc, lb), _free_axes(rhs_ndim, rc, rb)
    nb, nlf, nrf = len(lb), len(lfree), len(rfree)
    g_batch = tuple(range(nb))
    g_lfree = tuple(range(nb, nb + nlf))
    g_rfree = tuple(range(nb + nlf, nb + nlf + nrf))

    def product(own_free, own_batch, own_contract, other_free, other_batch, other_contract,
                g_other, g_own_free, ndim):
        # dot(g, other): contract g's other-free axes with other's free axes, batch on batch.
        pdn = ((g_other, other_free), (g_batch, other_batch))
        # result axes: [batch, g_own_free (= own free), other's remaining = other_contract sorted]
        other_rest = sorted(other_contract)
        pos = {}
        for i, a in enumerate(own_batch):
            pos[a] = i
        for j, a in enumerate(own_free):
            pos[a] = nb + j
        for a_own, a_other in zip(own_contract, other_contract, strict=True):
            pos[a_own] = nb + len(own_free) + other_rest.index(a_other)
        perm = tuple(pos[a] for a in range(ndim))
        return pdn, perm

    dlhs_dn, dlhs_perm = product(lfree, lb, lc, rfree, rb, rc, g_rfree, g_lfree, lhs_ndim)
    drhs_dn, drhs_perm = product(rfree, rb, rc, lfree, lb, lc, g_lfree, g_rfree, rhs_ndim)
    return dlhs_dn, dlhs_perm, drhs_dn, drhs_perm


def _derive_key(config: DotGeneralConfig, x, salt: int):
    """A key for stochastic rounding, derived from the config's seed and ``x``'s values."""
    specs = [config.lhs, config.rhs]
    for b in (config.dlhs, config.drhs):
        if b is not None:
            specs += [b.grad, b.operand]
    if not any(s is not None and s.rounding == "stochastic" for s in specs):
        return None
    xf = x.dequantize(jnp.float32) if isinstance(x, QArray) else x.astype(jnp.float32)
    # A wrapping integer sum of the bit patterns is exact, so the digest (hence the rounding
    # noise) doesn't depend on the reduction order: eager, jitted and sharded runs agree. A
    # float sum differs in its last bits between them and gave different keys.
    digest = jnp.sum(lax.bitcast_convert_type(xf, jnp.uint32), dtype=jnp.uint32)
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), salt), digest)


def _bwd_product(g, other, pdn, perm, spec: BackwardSpec | None, config, salt, dtype):
    gspec = spec.grad if spec is not None else None
    ospec = spec.operand if spec is not None else None
    key = _derive_key(config, g, salt) if (gspec or ospec) else None
    y = _forward(g, other, pdn, None, jnp.float32, gspec, ospec, config.int_dot, key)
    return jnp.transpose(y, perm).astype(dtype)


def _zero_cotangent(x):
    if isinstance(x, QArray):
        return jax.tree.map(_zero_cotangent, x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def _qdot_primal(lhs, rhs, dn, precision, preferred_element_type, config):
    key = _derive_key(config, lhs, 0)
    lq, rq = _quantized_operands(lhs, rhs, dn, config.lhs, config.rhs, key)
    y = _forward(lq, rq, dn, precision, preferred_element_type, None, None, config.int_dot, None,
                 tiling=config.tiling)
    return y, lq, rq


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _qdot(lhs, rhs, dn, precision, preferred_element_type, config):
    # Without differentiation only the product is traced: no dequantized residuals (a served
    # weight never appears in float in the jaxpr).
    return _qdot_primal(lhs, rhs, dn, precision, preferred_element_type, config)[0]


def _qdot_fwd(lhs, rhs, dn, precision, preferred_element_type, config):
    y, lq, rq = _qdot_primal(lhs, rhs, dn, precision, preferred_element_type, config)
    ftype = _float_dtype(lhs, rhs)
    res = (_as_float(lq, ftype), _as_float(rq, ftype), lhs, rhs)
    return y, res


def _qdot_bwd(dn, precision, preferred_element_type, config, res, g):
    lhat, rhat, lhs, rhs = res
    dlhs_dn, dlhs_perm, drhs_dn, drhs_perm = _grad_dims(dn, lhat.ndim, rhat.ndim)
    dl = _bwd_product(g, rhat, dlhs_dn, dlhs_perm, config.dlhs, config, 1, lhat.dtype)
    dr = _bwd_product(g, lhat, drhs_dn, drhs_perm, config.drhs, config, 2, rhat.dtype)
    dl = _zero_cotangent(lhs) if isinstance(lhs, QArray) else dl.astype(lhs.dtype)
    dr = _zero_cotangent(rhs) if isinstance(rhs, QArray) else dr.astype(rhs.dtype)
    return dl, dr


_qdot.defvjp(_qdot_fwd, _qdot_bwd)


# --- public entry points ------------------------------------------------------------------------


def _constrain_output(y, out_sharding):
    """``y`` on ``out_sharding``, as ``lax.dot_general(..., out_sharding=)`` places its output.

    Under a mesh with explicit axes the output is resharded (``jax.sharding.reshard``);
    otherwise it gets a sharding constraint (``lax.with_sharding_constraint``).
    """
    if out_sharding is None:
        return y
    if isinstance(out_sharding, jax.sharding.NamedSharding):
        axis_types = getattr(out_sharding.mesh, "axis_types", ())
    else:
        axis_types = getattr(jax.sharding.get_abstract_mesh(), "axis_types", ())
    if any(t == jax.sharding.AxisType.Explicit for t in axis_types):
        return jax.sharding.reshard(y, out_sharding)
    return lax.with_sharding_constraint(y, out_sharding)


def dot_general(
    lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *, config=None,
    out_sharding=None,
):
    """``lax.dot_general`` with quantized operands.

    Args:
      lhs: float array ``[...]`` or a :class:`QArray` (serving: used as is).
      rhs: float array or :class:`QArray`.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
      precision: passed to the float products.
      preferred_element_type: output dtype (default: the operands' float dtype).
      config: a :class:`DotGeneralConfig`; None is exactly ``lax.dot_general`` (a QArray
        operand is then dequantized first).
      out_sharding: sharding of the output, as for ``lax.dot_general`` (which gets it when
        ``config`` is None and no operand is a QArray; otherwise the output is constrained).

    Returns:
      ``[batch..., lhs_free..., rhs_free...]``, as ``lax.dot_general``.

    Example:
      >>> y = dot_general(x, w, (((1,), (0,)), ((), ())), config=w8a8())
    """
    if config is None and not isinstance(lhs, QArray) and not isinstance(rhs, QArray):
        kw = {} if out_sharding is None else {"out_sharding": out_sharding}
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kw)
    dn = _normalize_dn(dimension_numbers)
    _check_dn(lhs, rhs, dn)
    if config is None:
        y = dot_general_reference(lhs, rhs, dn, precision, preferred_element_type)
        return _constrain_output(y, out_sharding)
    if not isinstance(config, DotGeneralConfig):
        raise TypeError(f"config must be a DotGeneralConfig or None, got {type(config).__name__}.")
    return _constrain_output(
        _qdot(lhs, rhs, dn, precision, preferred_element_type, config), out_sharding
    )


def einsum(subscripts: str, lhs, rhs, *, config=None, precision=None,
           preferred_element_type=None, out_sharding=None):
    """Two-operand einsum on :func:`dot_general` (the string is parsed by
    :func:`~jaxquant.core.einsum_spec.parse_einsum`).

    Example:
      >>> y = einsum("bsd,dh->bsh", x, w, config=w8a8())   # x: [b, s, d], w: [d, h]
    """
    spec = parse_einsum(subscripts, len(lhs.shape), len(rhs.shape))
    perm = spec.output_perm
    y = dot_general(lhs, rhs, spec.dimension_numbers, precision, preferred_element_type,
                    config=config)
    y = y if perm == tuple(range(len(perm))) else jnp.transpose(y, perm)
    return _constrain_output(y, out_sharding)


@dataclasses.dataclass(frozen=True)
class QuantizedDotGeneral:
    """A ``dot_general`` bound to a config, with ``lax.dot_general``'s signature: what
    :func:`make_dot_general` returns. Frozen and compared by value, so two modules built with
    equal configs are equal (and share jit caches)."""

    config: DotGeneralConfig | None = None

    def __call__(self, lhs, rhs, dimension_numbers, precision=None,
                 preferred_element_type=None, *, out_sharding=None):
        return dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                           config=self.config, out_sharding=out_sharding)


def make_dot_general(config: DotGeneralConfig | None) -> QuantizedDotGeneral:
    """The hook for Flax: a ``dot_general`` with ``lax.dot_general``'s signature (plus the
    keyword ``out_sharding`` that Flax NNX passes) that quantizes per ``config``.

    Any other keyword raises ``TypeError``, as it would for ``lax.dot_general``.

    Example:
      >>> layer = nn.Dense(16, dot_general=make_dot_general(w8a8()))          # linen
      >>> layer = nnx.Linear(8, 16, dot_general=make_dot_general(w8a8()), rngs=rngs)  # NNX
      >>> layer = nn.Dense(16, dot_general_cls=lambda: make_dot_general(w8a8()))
    """
    if config is not None and not isinstance(config, DotGeneralConfig):
        raise TypeError(f"config must be a DotGeneralConfig or None, got {type(config).__name__}.")
    return QuantizedDotGeneral(config)
