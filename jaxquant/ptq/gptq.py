"""GPTQ (Frantar et al. 2022): quantize a linear layer column by column with error feedback.

Lingo: the kernel is ``w [d_in, d_out]`` (contracting axis 0, as in ``nn.Dense``). GPTQ's
"columns" are the input channels; internally we work on ``wt = w.T [d_out, d_in]``.

Steps, as in the paper's reference code:

1. ``H = 2 X^T X / n`` (see :mod:`jaxquant.ptq.hessian`); dead inputs (``H_ii = 0``) get
   ``H_ii = 1`` and a zero weight column.
2. Act-order (the default): visit columns by decreasing ``H_ii``. Groups then use *static*
   scales computed from the original weights before the pass, so every group stays a
   contiguous block of inputs and serving is plain grouped dequantization.
3. Dampen: ``H += damp * mean(diag H) * I``; take the upper Cholesky factor of ``H^-1``.
4. In blocks of ``block_size`` columns: quantize one column, spread its error
   ``(w - q) / [H^-1]_jj`` over the remaining columns of the block, then apply the block's
   accumulated error to all later columns at once (lazy batch update).
5. Without act-order, a group's scale is calibrated at the group's first column from the
   already-updated weights.

The whole per-layer pass is one jitted function (``lax.fori_loop`` over blocks and columns).

As a model-level algorithm (:class:`GPTQ`, recipe ``gptq:int4:g128``) it needs each site's
Hessian and, with ``PTQOptions.true_sequential`` (the default), measures it site by site on
inputs recomputed with the block's earlier linears already quantized.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant.core import calibration
from jaxquant.core.dot_general import operand_spec
from jaxquant.core.qarray import QArray, quantize
from jaxquant.core.spec import QuantSpec, resolve_layout
from jaxquant.ptq.algorithm import PTQAlgorithm, Stat


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQConfig:
    """GPTQ settings.

    Attributes:
      damp: dampening as a fraction of ``mean(diag H)`` (paper default 0.01).
      block_size: columns per lazy-update block (128 in the paper).
      act_order: visit columns by decreasing ``diag H`` (with static group scales). On by
        default: on SmolLM2-135M int4 g128 it took PTB perplexity from 62.7 to 56.7
        (experiments/RESULTS.md section 3).
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True

    def __post_init__(self):
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}.")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}.")


def _block_size(d_in: int, group: int | None, requested: int) -> int:
    """A block size that divides ``d_in`` and holds whole groups."""
    if group is not None and group > requested:
        return group
    b = requested
    while b > 1 and (d_in % b or (group is not None and b % group)):
        b -= 1
    return b


def _slice_spec(spec: QuantSpec) -> QuantSpec:
    """The spec of a ``[rows, d_out]`` slice with one scale per output column."""
    return dataclasses.replace(spec, channel_axes=(1,), group_size=None, group_axis=None)


def _calib(wslice_t: jax.Array, spec: QuantSpec):
    """Scale and zero point ``[d_out]`` for the columns ``wslice_t [d_out, k]``."""
    s_spec = _slice_spec(spec)
    x = wslice_t.T
    layout = resolve_layout(s_spec, x.shape)
    lo, hi = calibration.calibrate(x, s_spec, layout)
    scale, zp = calibration.compute_scale(lo, hi, s_spec)
    zp = jnp.zeros_like(scale) if zp is None else zp
    return scale[0].astype(jnp.float32), zp[0].astype(jnp.float32)


def _quant_col(w: jax.Array, s: jax.Array, z: jax.Array, spec: QuantSpec) -> jax.Array:
    """Quantize-dequantize one column ``w [d_out]`` with per-row scale / zero point."""
    s_spec = _slice_spec(spec)
    layout = resolve_layout(s_spec, (1, w.shape[0]))
    zp = None if spec.symmetric else z[None]
    q = calibration.quantize_codes(w[None], s[None], zp, s_spec, layout)
    return calibration.dequantize_codes(q, s[None], zp, spec.qtype, layout)[0]


@functools.partial(jax.jit, static_argnames=("spec", "block", "group", "static_groups"))
def _gptq_pass(wt, hinv, s0, z0, group_of_col, *, spec, block, group, static_groups):
    """The column sweep. ``wt [d_out, d_in]`` (columns already in visiting order)."""
    d_out, d_in = wt.shape
    n_groups = s0.shape[0]

    def block_body(b, carry):
        w, q_all, s_all, z_all, loss = carry
        i1 = b * block
        w1 = jax.lax.dynamic_slice(w, (0, i1), (d_out, block))
        h1 = jax.lax.dynamic_slice(hinv, (i1, i1), (block, block))

        def col_body(i, c):
            w1, q1, e1, s_all, z_all, loss = c
            col = i1 + i
            if static_groups or group is None:
                g_idx = group_of_col[col]
                s, z = s_all[g_idx], z_all[g_idx]
            else:
                g_idx = col // group

                def fresh(_):
                    return _calib(jax.lax.dynamic_slice(w1, (0, i), (d_out, group)), spec)

                s, z = jax.lax.cond(col % group == 0, fresh,
                                    lambda _: (s_all[g_idx], z_all[g_idx]), None)
                s_all = s_all.at[g_idx].set(s)
                z_all = z_all.at[g_idx].set(z)
            wcol = w1[:, i]
            d = h1[i, i]
            qcol = _quant_col(wcol, s, z, spec)
            err = (wcol - qcol) / d
            # h1 is upper triangular, so this only touches columns >= i of the block.
            w1 = w1 - err[:, None] * h1[i][None, :]
            q1 = q1.at[:, i].set(qcol)
            e1 = e1.at[:, i].set(err)
            loss = loss + jnp.sum((wcol - qcol) ** 2) / (d * d) / 2
            return w1, q1, e1, s_all, z_all, loss

        zeros = jnp.zeros((d_out, block), wt.dtype)
        _, q1, e1, s_all, z_all, loss = jax.lax.fori_loop(
            0, block, col_body, (w1, zeros, zeros, s_all, z_all, loss))
        rows = jax.lax.dynamic_slice(hinv, (i1, 0), (block, d_in))
        later = (jnp.arange(d_in) >= i1 + block)[None, :]
        w = w - jnp.matmul(e1, rows * later, precision="highest")
        q_all = jax.lax.dynamic_update_slice(q_all, q1, (0, i1))
        return w, q_all, s_all, z_all, loss

    carry = (wt, jnp.zeros_like(wt), s0, z0, jnp.zeros((), jnp.float32))
    _, q, s_all, z_all, loss = jax.lax.fori_loop(0, d_in // block, block_body, carry)
    del n_groups
    return q, s_all, z_all, loss


def _inverse_cholesky(h: jax.Array, damp: float) -> jax.Array:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U = H^-1``)."""
    d = h.shape[0]
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(d, dtype=h.dtype)
    low = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((low, True), jnp.eye(d, dtype=h.dtype))
    return jnp.linalg.cholesky(hinv).T


def column_axes(w) -> tuple[Mesh, tuple[str, ...]] | None:
    """The mesh and mesh axes to run GPTQ's sweep over, split by output columns, for a kernel
    ``w [d_in, d_out]`` placed on a device mesh; None for a kernel on one device.

    GPTQ's output columns are independent (the error feedback runs along the inputs, and every
    column shares ``H``), so each device can sweep its own block of columns with the whole
    ``H^-1``: no communication but the loss's sum. The axes are the mesh axes that shard either
    dimension of ``w`` (a tensor-parallel layer split by rows is swept by columns all the same),
    kept in mesh order while their product divides ``d_out``.
    """
    sharding = getattr(w, "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1:
        return None
    used = {a for entry in sharding.spec if entry is not None
            for a in ((entry,) if isinstance(entry, str) else entry)}
    mesh, axes, n = sharding.mesh, [], 1
    for name in mesh.axis_names:
        if name in used and w.shape[1] % (n * mesh.shape[name]) == 0:
            axes.append(name)
            n *= mesh.shape[name]
    return (mesh, tuple(axes)) if n > 1 else None


@functools.lru_cache(maxsize=64)  # one compiled sweep per (mesh, axes, spec, block, groups)
def _sharded_sweep(mesh: Mesh, axes: tuple[str, ...], static: tuple):
    return _sharded_pass(mesh, axes, **dict(static))


def _sharded_pass(mesh: Mesh, axes: tuple[str, ...], **static):
    """:func:`_gptq_pass` with ``wt``'s rows (the output columns) split over ``axes``."""
    cols = P(axes, None)
    scales = P(None, axes)

    def local(wt, hinv, s0, z0, group_of_col):
        q, s_all, z_all, loss = _gptq_pass(wt, hinv, s0, z0, group_of_col, **static)
        return q, s_all, z_all, jax.lax.psum(loss, axes)

    # check_vma off: the sweep's loop carries start as replicated zeros and become per-device
    # values, which the varying-axes check would make us cast by hand in _gptq_pass.
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(cols, P(), scales, scales, P()),
                                 out_specs=(cols, scales, scales, P()), check_vma=False))


def gptq_quantize(
    w: jax.Array, h: jax.Array, spec: QuantSpec, config: GPTQConfig = GPTQConfig()
) -> tuple[QArray, dict]:
    """GPTQ-quantizes one kernel.

    A kernel placed on a device mesh (a :class:`~jax.sharding.NamedSharding` over several
    devices) is swept with its output columns split over the mesh axes that shard it (see
    :func:`column_axes`): each device holds ``d_out / n`` columns and the whole ``H^-1``, and
    the result equals the one-device sweep (the per-column arithmetic is the same).

    Args:
      w: kernel ``[d_in, d_out]``.
      h: Hessian ``[d_in, d_in]`` (``2 X^T X / n`` of the layer's inputs).
      spec: operand spec as in a :class:`~jaxquant.DotGeneralConfig` (``qtype``,
        ``group_size``, ``symmetric``, ``calibration``; no axes).
      config: :class:`GPTQConfig`.

    Returns:
      ``(qarray, info)``: the kernel as a :class:`QArray` laid out exactly as
      ``quantize_operand(w, spec, (0,))`` (so it serves through ``dot_general``), and
      ``info`` with ``loss`` (GPTQ's objective) and ``dead`` (number of dead inputs).

    Raises:
      ValueError: shape mismatch, or a Hessian that stays singular after dampening.
    """
    columns = column_axes(w)
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"gptq_quantize needs w [d_in, d_out] and h [d_in, d_in]; got "
                         f"{w.shape} and {h.shape}.")
    full = operand_spec(spec, 2, (0,))
    layout = resolve_layout(full, w.shape)  # validates group_size | d_in
    d_in, d_out = w.shape
    group = spec.group_size
    h = jnp.asarray(h, jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w = jnp.where(dead[:, None], 0.0, w)

    static = config.act_order or group is None
    if static:
        lo, hi = calibration.calibrate(w, full, layout)
        s0, z0 = calibration.compute_scale(lo, hi, full)
        z0 = jnp.zeros_like(s0) if z0 is None else z0
    else:
        s0 = jnp.ones(layout.scale_shape, jnp.float32)
        z0 = jnp.zeros(layout.scale_shape, jnp.float32)
    s0, z0 = s0.astype(jnp.float32), z0.astype(jnp.float32)

    perm = np.arange(d_in)
    if config.act_order:
        perm = np.asarray(jnp.argsort(-jnp.diag(h), stable=True))
    group_of_col = jnp.asarray(perm // group if group else np.zeros(d_in, np.int32), jnp.int32)
    hp = h[perm][:, perm]
    hinv = _inverse_cholesky(hp, config.damp)
    if not bool(jnp.all(jnp.isfinite(hinv))):
        raise ValueError(
            f"The Hessian is not positive definite even with damp={config.damp}; raise "
            "GPTQConfig.damp (e.g. 0.05) or use more calibration tokens.")
    block = _block_size(d_in, group, config.block_size)
    static_args = dict(spec=full, block=block, group=group, static_groups=static)
    sweep = (functools.partial(_gptq_pass, **static_args) if columns is None
             else _sharded_sweep(*columns, tuple(sorted(static_args.items()))))
    q, s_all, z_all, loss = sweep(w.T[:, perm], hinv, s0, z0, group_of_col)
    q_kernel = q[:, np.argsort(perm)].T
    scale = s_all.astype(jnp.dtype(full.scale_dtype))
    zp = None if full.symmetric else z_all.astype(jnp.dtype(full.scale_dtype))
    qarr = quantize(q_kernel.astype(w.dtype), full, scale=scale, zero_point=zp)
    return qarr, {"loss": float(loss), "dead": int(dead.sum())}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQ(PTQAlgorithm):
    """GPTQ on every linear, from its site's Hessian (``PTQOptions.gptq`` settings)."""

    int_only: ClassVar[bool] = True

    @property
    def needs(self):
        return frozenset({Stat.HESSIAN})

    @property
    def sequential(self):
        return self.options.true_sequential

    def quantize_linear(self, kernel, spec, inputs, *, site, linear):
        del site, linear
        q, _ = gptq_quantize(kernel, inputs.hessian(), spec, self.options.gptq)
        return q
