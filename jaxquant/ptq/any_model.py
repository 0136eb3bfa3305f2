"""Calibrated PTQ (GPTQ, AWQ, SmoothQuant) of any model :func:`jaxquant.quantize_model` handles.

``jq.quantize_model(model, rules, *inputs)`` makes a Flax linen or NNX model quantization-aware,
and ``to_serving`` rounds its kernels to nearest. :func:`calibrate_and_convert` is ``to_serving``
with GPTQ: it runs the model's own *float* forward on calibration batches, captures the input of
every quantized ``Dense`` / ``DenseGeneral`` / ``Einsum`` / ``Conv`` (linen: an
``nn.intercept_methods`` interceptor; NNX: the layers' own ``dot_general`` / ``einsum_op`` /
``conv_general_dilated`` hooks), accumulates each layer's Hessian ``H = 2 X^T X / n`` on the
layer's matrix view (:mod:`jaxquant.ptq.kernel_view`: N-D kernels flattened along their
contracting axes, convolutions as im2col patches), and quantizes the kernel with the GPTQ solver
(:func:`~jaxquant.ptq.gptq.gptq_quantize`) under the layer's own plan (format, group size
adapted to the layer). The result is laid out exactly as ``to_serving`` lays it out, so the model
serves it unchanged. All layers' statistics come from one float pass (one-shot).

AWQ and SmoothQuant (:mod:`jaxquant.ptq.any_model_scales`) also search a per-input-channel scale
``s`` per layer from the same statistics; the served layer keeps it as ``input_scale`` and
computes ``(x / s) . Q(W * s)`` (:mod:`jaxquant.nn.input_scale`), since on an arbitrary model
there is no known op before the layer to fold ``1 / s`` into.

Layers GPTQ does not apply to (embeddings, attention products) are converted as ``to_serving``
converts them. Capturing the inputs is :mod:`jaxquant.ptq.layer_inputs`; the matrix views are
:mod:`jaxquant.ptq.kernel_view`.

Example (linen)::

    qmodel = jq.quantize_model(model, rules, x)
    variables = model.init(key, x)
    serving = calibrate_and_convert(qmodel, variables, [(x1,), (x2,)])   # GPTQ
    serving = calibrate_and_convert(qmodel, variables, batches, method="awq")
    y = qmodel.apply(serving, x)

Example (NNX)::

    qmodel = jq.quantize_model(model, rules, x)
    served = calibrate_and_convert(qmodel, [(x1,), (x2,)])
    y = served(x)
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxquant.core import QArray
from jaxquant.core.dot_general import quantize_operand
from jaxquant.core.qtypes import QKind, get_qtype
from jaxquant.nn.any_model import layer_plans
from jaxquant.nn.input_scale import INPUT_SCALE
from jaxquant.nn.layer_quant import LayerPlan, Op
from jaxquant.nn.linen_model import convert_linen
from jaxquant.ptq.any_model_scales import SCALED_METHODS, AWQConfig, ScaleConfig
from jaxquant.ptq.awq import quantize_with_ranges
from jaxquant.ptq.gptq import GPTQConfig, gptq_quantize
from jaxquant.ptq.hessian import InputStats, hessian
from jaxquant.ptq.kernel_view import (
    channel_rows,
    from_matrix,
    matrix_spec,
    matrix_view,
    scale_to_kernel,
    to_matrix,
)
from jaxquant.ptq.layer_inputs import iter_batches, measure

METHODS = ("rtn", "gptq", *SCALED_METHODS)
_GPTQ_DEFAULT = GPTQConfig()


def calibrate_and_convert(
    qmodel,
    *args,
    method: str | ScaleConfig = "gptq",
    gptq: GPTQConfig = _GPTQ_DEFAULT,
    call_kwargs: Mapping | None = None,
    blocks: str | None = None,
):
    r"""Serving form of a quantized model, its kernels quantized by GPTQ (or AWQ, SmoothQuant)
    on calibration data.

    linen: ``calibrate_and_convert(qmodel, variables, calib_batches)`` returns serving variables
    (as ``to_serving(qmodel, variables)`` does). NNX: ``calibrate_and_convert(qmodel,
    calib_batches)`` returns a serving copy (as ``to_serving(qmodel)`` does).

    Args:
      qmodel: a model from :func:`jaxquant.quantize_model`.
      *args: linen: ``(variables, calib_batches)``; NNX: ``(calib_batches,)``.
        ``calib_batches`` is an iterable of tuples of positional inputs of the model's
        ``__call__`` (``[(x1,), (x2,)]``; ``None`` is allowed with ``method="rtn"``).
      method: ``"gptq"``; ``"rtn"`` (round to nearest through the same matrix views: the
        same params as ``to_serving``); ``"awq"`` (a searched input scale ``s`` per layer, then
        ``W * s`` rounded to nearest with clipped scales: AWQ's clip search),
        ``"awq+gptq"`` (``W * s`` solved by GPTQ, no clip search) or
        ``"smoothquant"`` (rules that quantize activations); or an
        :class:`~jaxquant.ptq.any_model_scales.AWQConfig` /
        :class:`~jaxquant.ptq.any_model_scales.SmoothQuantConfig` for their settings. With a
        scale, each layer serves ``(x / s) . Q(W * s)``: ``s`` is stored next to its kernel
        (linen: ``params/<layer>/input_scale``; NNX: ``<layer>.input_scale``, an
        :class:`~jaxquant.nn.nnx_model.InputScale`).
      gptq: :class:`~jaxquant.ptq.gptq.GPTQConfig` (damp, block size, act order).
      call_kwargs: keyword arguments of every calibration call (e.g. ``{"train": False}``).
      blocks: None (one-shot: every layer's statistics from one float pass), or a regex matched
        at the start of layer paths whose match names a repeated block (``r"block_\d+"``,
        ``r"blocks/\d+"``): sequential calibration. Layers are quantized group by group in the order
        the forward calls them (a block's layers, or a run of layers outside any block), each
        group on inputs recomputed with the groups before it quantized (their weights on the
        grid; activations float). One float pass over the batches per group.

    Returns:
      linen: serving variables for ``qmodel.apply``; NNX: the serving module.

    Raises:
      ValueError: an unknown method, an empty or malformed ``calib_batches``, a batch the
        model's forward rejects, a quantized layer no batch reaches, a layer GPTQ cannot
        quantize (non-int weights, a kernel with batch axes), a layer without one scale per
        input channel (a grouped conv) for AWQ / SmoothQuant, or SmoothQuant on a layer whose
        rule keeps activations float.
    """
    linen = isinstance(qmodel, nn.Module)
    variables, batches = _split_args(linen, args)
    solver, scaler = _resolve_method(method)
    if not isinstance(gptq, GPTQConfig):
        raise ValueError(f"gptq must be a GPTQConfig, got {type(gptq).__name__}.")
    plans = layer_plans(qmodel)
    targets = {
        p: plan
        for p, plan in plans.items()
        if plan.op in (Op.DOT, Op.EINSUM, Op.CONV) and plan.config.rhs is not None
    }
    for plan in targets.values() if scaler is not None else ():
        scaler.check(plan)
    if solver == "gptq":
        for plan in targets.values():
            if get_qtype(plan.config.rhs.qtype).kind is not QKind.INT:
                raise ValueError(
                    f"{plan.path}: GPTQ needs intN weights, this layer's rule asks for "
                    f"{plan.config.rhs.qtype}. Use method='rtn' / 'awq', or an int format "
                    "for it."
                )
    if batches is None and (solver, scaler) != ("rtn", None):
        raise ValueError(f"method={_name(method)!r} needs calib_batches (tuples of model "
                         "inputs).")
    weights = _float_weights(qmodel, variables, targets, linen)
    call = (qmodel, variables, dict(call_kwargs or {}), linen)
    scales: dict[str, jax.Array] = {}
    if (solver, scaler) == ("rtn", None):
        kernels = {p: quantize_layer(plan, weights[p], None)[0] for p, plan in targets.items()}
    elif blocks is None:
        stats, _ = measure(*call, targets, batches)
        kernels = {}
        for p, plan in targets.items():
            kernels[p], _, scales[p] = _convert_layer(plan, weights[p], stats[p], solver, scaler,
                                                      gptq)
    else:
        kernels, scales = _sequential(*call, targets, batches, weights, blocks,
                                      (solver, scaler, gptq))
    scales = {p: s for p, s in scales.items() if s is not None}
    if linen:
        flat = traverse_util.flatten_dict(_as_dict(variables["params"]))
        for p, q in kernels.items():
            flat[(*(k for k in p.split("/") if k), targets[p].weight_name)] = q
        for p, s in scales.items():
            flat[(*(k for k in p.split("/") if k), INPUT_SCALE)] = s
        return convert_linen(qmodel, {**variables, "params": traverse_util.unflatten_dict(flat)})
    from jaxquant.nn.nnx_model import to_serving_nnx

    return to_serving_nnx(qmodel, kernels, scales)


def _name(method) -> str:
    return method if isinstance(method, str) else getattr(method, "name", repr(method))


def _resolve_method(method) -> tuple[str, ScaleConfig | None]:
    """``(solver, scaler)``: ``"rtn"`` or ``"gptq"`` for the (scaled) kernel, and the input
    scale's config (None: no input scale)."""
    if isinstance(method, str):
        if method in ("rtn", "gptq"):
            return method, None
        if method not in SCALED_METHODS:
            raise ValueError(f"method must be one of {METHODS} (or an AWQConfig / "
                             f"SmoothQuantConfig), got {method!r}.")
        method = SCALED_METHODS[method]
    if not isinstance(method, ScaleConfig):
        raise ValueError(f"method must be one of {METHODS} or an AWQConfig / SmoothQuantConfig, "
                         f"got a {type(method).__name__}.")
    return ("gptq" if isinstance(method, AWQConfig) and method.gptq else "rtn"), method


def _convert_layer(plan, kernel, stats, solver, scaler, config):
    """``(qarray, wq2, s)``: one layer's serving kernel, the float matrix the layer computes
    with (``Q(W * s) / s`` on the matrix view) and its input scale (None without a scaler)."""
    s = ranges = None
    if scaler is not None:
        w2 = _to_matrix(plan, kernel)
        s, _ = scaler.scale(plan, w2, stats)
        if solver == "rtn":  # AWQ's clip search (GPTQ calibrates its own scales)
            ranges = scaler.weight_ranges(plan, w2 * channel_rows(plan, s)[:, None], stats, s)
    q, wq2 = quantize_layer(plan, kernel, None if solver == "rtn" else stats, config, scale=s,
                            ranges=ranges)
    if s is not None:
        wq2 = wq2 / channel_rows(plan, s)[:, None]
    return q, wq2, s


def quantize_layer(
    plan: LayerPlan,
    kernel: jax.Array,
    stats: InputStats | None,
    config: GPTQConfig = _GPTQ_DEFAULT,
    *,
    scale: jax.Array | None = None,
    ranges: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[QArray, jax.Array]:
    """One layer's serving kernel, from its float kernel and its inputs' statistics.

    Args:
      plan: the layer's :class:`~jaxquant.nn.layer_quant.LayerPlan`.
      kernel: the float kernel, ``plan.kernel_shape``.
      stats: :class:`~jaxquant.ptq.hessian.InputStats` of the matrix view's rows with a leading
        feature-group axis (``xtx [groups, d_in, d_in]``); None rounds to nearest.
      config: GPTQ settings.
      scale: an input scale ``s`` (``input_scale_shape(plan)``, AWQ / SmoothQuant): the kernel
        quantized is ``W * s`` (its matrix rows times ``s``), and GPTQ's Hessian is that of the
        inputs ``x / s``, ``diag(1/s) H diag(1/s)``.
      ranges: with ``stats=None``, the ranges ``(lo, hi)`` of the (scaled) matrix to round it
        with, each ``[d_in / group or 1, d_out]`` (AWQ's clipped ranges,
        :meth:`~jaxquant.ptq.any_model_scales.AWQConfig.weight_ranges`); None: the spec's own
        calibration.

    Returns:
      ``(qarray, w2)``: the kernel laid out as ``plan.quantize_kernel(kernel)`` lays it out,
      and the quantized matrix ``w2 [d_in, d_out]`` (float32) it represents (of ``W * s``).
    """
    w2 = _to_matrix(plan, kernel)
    spec = matrix_spec(plan)
    r = None if scale is None else channel_rows(plan, jnp.asarray(scale, jnp.float32))
    if r is not None:
        w2 = w2 * r[:, None]
    if ranges is not None and stats is not None:
        raise ValueError(f"{plan.path}: ranges are for rounding to nearest; GPTQ (stats given) "
                         "calibrates its own scales. Pass one of them.")
    if stats is None:
        parts = (_rtn(w2, spec) if ranges is None else _rtn_ranges(w2, spec, *ranges),)
    else:
        groups = int(stats.count.shape[0])
        cols = w2.shape[1] // groups
        parts = []
        for j in range(groups):
            h = hessian(jax.tree.map(lambda a, j=j: a[j], stats))
            if r is not None:
                h = h / (r[:, None] * r[None, :])
            parts.append(gptq_quantize(w2[:, j * cols : (j + 1) * cols], h, spec, config)[0])
    q, wq2 = _assemble(plan, tuple(parts))
    dtype = np.dtype(jnp.asarray(kernel).dtype)
    if q.dtype != dtype:
        q = dataclasses.replace(q, dtype=dtype)
    return q, wq2


# One compiled program per layer plan (eager dispatch compiles every small op per shape).
_rtn = jax.jit(lambda w2, spec: quantize_operand(w2, spec, (0,)), static_argnums=1)
_rtn_ranges = jax.jit(quantize_with_ranges, static_argnums=1)
_to_matrix = jax.jit(lambda plan, w: to_matrix(plan, w).astype(jnp.float32), static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _assemble(plan: LayerPlan, parts: tuple[QArray, ...]) -> tuple[QArray, jax.Array]:
    """The kernel QArray (``plan``'s layout) of the quantized matrix whose column blocks are
    ``parts`` (2-D QArrays laid out as ``quantize_operand(w2, spec, (0,))``), and the matrix."""
    wq2 = jnp.concatenate([q.dequantize(jnp.float32) for q in parts], axis=1)
    scale = jnp.concatenate([q.scale for q in parts], axis=1)
    zp = None
    if parts[0].zero_point is not None:
        zp = jnp.concatenate([q.zero_point for q in parts], axis=1)
    q = plan.quantize_kernel(
        from_matrix(plan, wq2),
        scale=scale_to_kernel(plan, scale),
        zero_point=scale_to_kernel(plan, zp),
    )
    return q, wq2


# --- arguments ---------------------------------------------------------------------------------


def _split_args(linen: bool, args):
    if linen:
        if len(args) != 2:
            raise ValueError(
                "calibrate_and_convert(qmodel, variables, calib_batches): a linen model needs "
                f"its variables and the batches; got {len(args)} positional arguments."
            )
        variables, batches = args
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError("variables must be the dict qmodel.init returns, {'params': ...}.")
        return variables, batches
    if len(args) != 1:
        raise ValueError(
            "calibrate_and_convert(qmodel, calib_batches): an NNX model holds its own params; "
            f"pass only the batches (got {len(args)} positional arguments)."
        )
    return None, args[0]


def _sequential(qmodel, variables, call_kwargs, linen, targets, batches, weights, blocks, how):
    """Sequential calibration: group by group (see ``blocks`` of :func:`calibrate_and_convert`);
    ``how`` is ``(solver, scaler, gptq_config)``. Returns ``(kernels, input scales)``."""
    try:
        pattern = re.compile(blocks)
    except (re.error, TypeError) as e:
        raise ValueError(f"blocks must be a regex naming repeated blocks, got {blocks!r}.") from e

    def block_of(path):
        m = pattern.match(path)
        return None if m is None or not m.group(0) else m.group(0)

    if not any(block_of(p) for p in targets):
        raise ValueError(f"blocks={blocks!r} matches the start of no quantized layer's path "
                         f"(paths: {sorted(targets)[:6]}).")
    batches = [b for _, b in iter_batches(batches)]  # read once, replayed for every group
    call = (qmodel, variables, call_kwargs, linen)
    _, order = measure(*call, targets, batches[:1])  # the execution order
    groups: list[list[str]] = []
    for p in order:
        if groups and block_of(groups[-1][0]) == block_of(p):
            groups[-1].append(p)
        else:
            groups.append([p])
    kernels, scales, done = {}, {}, {}
    for group in groups:
        stats, _ = measure(*call, {p: targets[p] for p in group}, batches, done)
        for p in group:
            kernels[p], wq2, scales[p] = _convert_layer(targets[p], weights[p], stats[p], *how)
            done[p] = from_matrix(targets[p], wq2).astype(jnp.asarray(weights[p]).dtype)
    return kernels, scales


def _float_weights(qmodel, variables, targets, linen) -> dict[str, jax.Array]:
    if linen:
        flat = traverse_util.flatten_dict(_as_dict(variables["params"]))
        out = {}
        for p, plan in targets.items():
            key = (*(k for k in p.split("/") if k), plan.weight_name)
            if key not in flat:
                raise ValueError(f"{p}: no {plan.weight_name} at params/{'/'.join(key)}.")
            if isinstance(flat[key], QArray):
                raise ValueError(f"{p}: the kernel is already quantized; pass float variables.")
            out[p] = flat[key]
        return out
    from flax import nnx

    out = {}
    for keys, node in nnx.iter_graph(qmodel):
        p = "/".join(str(k) for k in keys)
        if p in targets and isinstance(node, nnx.Module):
            w = getattr(node, targets[p].weight_name)
            if not isinstance(w, nnx.Param):
                raise ValueError(f"{p}: the kernel is already served; pass the float qmodel.")
            out[p] = w.get_value()
    return out


def _as_dict(tree):
    if isinstance(tree, Mapping):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


__all__ = ["METHODS", "calibrate_and_convert", "matrix_view", "quantize_layer"]
