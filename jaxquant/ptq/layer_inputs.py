"""The inputs of every quantized layer of any model, from the model's own float forward.

For :func:`~jaxquant.ptq.any_model.calibrate_and_convert`: the float model (linen: the user's
class, :func:`~jaxquant.nn.linen_model.float_linen`; NNX: a copy of the quantized model with
every quantized product back to float) runs on the calibration batches while each quantized
``Dense`` / ``DenseGeneral`` / ``Einsum`` / ``Conv`` records its input as the rows of its matrix
view (:mod:`jaxquant.ptq.kernel_view`). Linen layers are reached through an
``nn.intercept_methods`` interceptor (which sets the layer's ``dot_general`` /
``conv_general_dilated`` hook for the call; ``nn.Einsum`` has none: its input is the call's);
NNX layers through the same hooks ``quantize_model`` sets. The rows of each batch are added to
:class:`~jaxquant.ptq.hessian.InputStats` (``stats_update``) inside one jitted step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxquant.nn.any_model import layer_plans
from jaxquant.nn.layer_quant import LayerPlan, Op
from jaxquant.nn.linear import QuantizedLinear
from jaxquant.nn.linen_model import _patched, float_linen
from jaxquant.nn.rules import module_path
from jaxquant.ptq.hessian import InputStats, stats_init, stats_update
from jaxquant.ptq.kernel_view import LayerCallError, conv_rows, dot_rows, einsum_rows

# The hook attribute of each op (NNX; linen: dot and conv, plus ``<hook>_cls``).
_HOOKS = {Op.DOT: "dot_general", Op.CONV: "conv_general_dilated", Op.EINSUM: "einsum_op"}


def iter_batches(batches: Iterable):
    """Yields ``(i, batch)`` with each batch a tuple of arrays; raises on an empty iterable."""
    if isinstance(batches, (jax.Array, np.ndarray)):
        raise ValueError(
            "calib_batches is one array; pass an iterable of tuples of inputs: [(x1,), (x2,)]."
        )
    n = 0
    for i, b in enumerate(batches):
        if not isinstance(b, (tuple, list)):
            raise ValueError(
                f"calib_batches[{i}] is a {type(b).__name__}, not a tuple of the model's "
                "positional inputs; wrap one input as (x,)."
            )
        n += 1
        yield i, tuple(b)
    if n == 0:
        raise ValueError("calib_batches is empty: pass at least one tuple of model inputs.")


def _shapes(batch) -> list:
    return [tuple(np.shape(x)) for x in jax.tree.leaves(batch)]


# --- measuring: the float forward with every quantized layer's input captured ------------------


class _Sink:
    """Rows captured during one traced forward: ``{path: [rows [groups, tokens, d_in], ...]}``."""

    def __init__(self, targets: Mapping[str, LayerPlan]):
        self.targets = targets
        self.rows: dict[str, list] = {}
        self.order: list[str] = []  # paths in the order the forward first calls them

    def add(self, path: str, rows: jax.Array) -> None:
        if path not in self.order:
            self.order.append(path)
        self.rows.setdefault(path, []).append(rows)

    def take(self) -> dict[str, jax.Array]:
        out = {p: jnp.concatenate(r, axis=1) for p, r in self.rows.items()}
        self.rows = {}
        return out


def _capture_fn(plan: LayerPlan, sink: _Sink):
    """A float product for ``plan``'s hook that records its input's rows."""
    if plan.op is Op.CONV:

        def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, batch_group_count=1, **kw):
            sink.add(plan.path, conv_rows(
                plan, lhs, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
                dimension_numbers, feature_group_count, batch_group_count))
            return jax.lax.conv_general_dilated(
                lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                **kw)

        return conv
    if plan.op is Op.EINSUM:

        def ein(subscripts, lhs, rhs, **kw):
            sink.add(plan.path, einsum_rows(plan, subscripts, lhs)[None])
            kw = {k: v for k, v in kw.items() if v is not None}
            return jnp.einsum(subscripts, lhs, rhs, **kw)

        return ein

    def dot(lhs, rhs, dimension_numbers, *a, **kw):
        sink.add(plan.path, dot_rows(plan, lhs, dimension_numbers)[None])
        if kw.get("out_sharding", 0) is None:
            kw.pop("out_sharding")
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, *a, **kw)

    return dot


def _linen_interceptor(sink: _Sink):
    def interceptor(next_fun, args, kwargs, ctx):
        if ctx.method_name != "__call__":
            return next_fun(*args, **kwargs)
        mod = ctx.module
        plan = sink.targets.get(module_path(mod))
        if plan is None:
            return next_fun(*args, **kwargs)
        if isinstance(mod, QuantizedLinear) and plan.op is Op.DOT:  # jaxquant's: no hook
            x = args[0] if args else kwargs["x"]
            sink.add(plan.path, dot_rows(plan, x, mod.dimension_numbers(jnp.ndim(x)))[None])
            return next_fun(*args, **kwargs)
        if plan.op is Op.EINSUM:  # linen's Einsum has no hook: its input is the call's
            x = args[0] if args else kwargs["inputs"]
            eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or mod.einsum_str
            sink.add(plan.path, einsum_rows(plan, eq, x)[None])
            return next_fun(*args, **kwargs)
        hook = _HOOKS[plan.op]
        with _patched(mod, {hook: _capture_fn(plan, sink), hook + "_cls": None}):
            return next_fun(*args, **kwargs)

    return interceptor


def float_forward(qmodel, variables, call_kwargs, linen, targets, overrides=None):
    """The float forward of a quantized model, recording its target layers' inputs.

    Args:
      qmodel: a model from ``quantize_model`` (linen or NNX).
      variables: linen: its float variables; NNX: None.
      call_kwargs: keyword arguments of every call.
      linen: whether ``qmodel`` is a linen module.
      targets: ``{path: LayerPlan}`` of the dot / einsum / conv layers to record.
      overrides: ``{path: kernel}`` used in place of those layers' float kernels.

    Returns:
      ``(fn, state, sink)``: ``fn(state, batch)`` (traceable) runs the model on the tuple of
      inputs ``batch`` and returns ``{path: rows [groups, tokens, d_in]}``; ``sink.order`` lists
      the targets in the order the forward first called them.
    """
    sink = _Sink(targets)
    plans = layer_plans(qmodel)
    overrides = dict(overrides or {})
    if linen:
        model = float_linen(qmodel)
        interceptor = _linen_interceptor(sink)
        if overrides:
            flat = traverse_util.flatten_dict(_as_dict(variables["params"]))
            for p, w in overrides.items():
                flat[(*(k for k in p.split("/") if k), plans[p].weight_name)] = w
            variables = {**variables, "params": traverse_util.unflatten_dict(flat)}

        def fn(variables, batch):
            with nn.intercept_methods(interceptor):
                model.apply(variables, *batch, **call_kwargs)
            return sink.take()

        return fn, variables, sink
    from flax import nnx

    from jaxquant.nn.nnx_model import QuantEmbed
    from jaxquant.nn.quant_attention import NnxAttentionFn

    model = nnx.clone(qmodel)
    for keys, node in list(nnx.iter_graph(model)):  # every quantized product back to float
        path = "/".join(str(k) for k in keys)
        if isinstance(node, QuantEmbed):
            object.__setattr__(node, "__class__", nnx.Embed)
        elif isinstance(node, nnx.MultiHeadAttention) and isinstance(
            node.attention_fn, NnxAttentionFn
        ):
            node.attention_fn = nnx.dot_product_attention
        elif path in plans and plans[path].op in _HOOKS and isinstance(node, nnx.Module):
            into = sink if path in targets else _Sink({})  # float weights: run, record nothing
            setattr(node, _HOOKS[plans[path].op], _capture_fn(plans[path], into))
            if path in overrides:
                getattr(node, plans[path].weight_name).set_value(overrides[path])
    graphdef, state = nnx.split(model)

    def fn(state, batch):
        nnx.merge(graphdef, state)(*batch, **call_kwargs)
        return sink.take()

    return fn, state, sink


def measure(qmodel, variables, call_kwargs, linen, targets, batches, overrides=None):
    """Input statistics of the target layers over the calibration batches (one jitted step per
    batch; arguments as :func:`float_forward`'s, ``batches`` an iterable of input tuples).

    Returns:
      ``(stats, order)``: ``{path: InputStats}`` of each target's rows (``xtx [groups, d_in,
      d_in]``), and the targets in the order the forward calls them.

    Raises:
      ValueError: an empty or malformed ``batches``, a batch the model's forward rejects (one
        line, naming the batch and its shapes), or a target no batch reaches.
    """
    fn, state, sink = float_forward(qmodel, variables, call_kwargs, linen, targets, overrides)

    def step(state, batch, stats):
        rows = fn(state, batch)
        return {p: jax.vmap(stats_update)(stats[p], rows[p]) for p in stats}

    step = jax.jit(step)
    stats = None
    for i, batch in iter_batches(batches):
        try:
            if stats is None:
                shapes = jax.eval_shape(fn, state, batch)
            else:
                stats = step(state, batch, stats)
        except LayerCallError:
            raise
        except Exception as e:  # the model's own error on a bad batch
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise ValueError(
                f"calib_batches[{i}] (input shapes {_shapes(batch)}): the model's float forward "
                f"failed on it ({type(e).__name__}: {msg}). Pass tuples of inputs like the "
                "example inputs given to quantize_model."
            ) from e
        if stats is None:
            missing = sorted(set(targets) - set(shapes))
            if missing:
                raise ValueError(
                    f"layers {missing[:4]} are quantized, but the model's forward on the "
                    "calibration batches never calls them; pass inputs that reach them."
                )
            stats = step(state, batch, {p: _stats_init(*shapes[p].shape[::2]) for p in targets})
    for p, s in stats.items():
        if int(s.count.min()) == 0:
            raise ValueError(f"{p}: no calibration token reached this layer.")
    return stats, list(sink.order)


def _stats_init(groups: int, d_in: int) -> InputStats:
    s = stats_init(d_in)
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (groups, *a.shape)), s)


def _as_dict(tree):
    if isinstance(tree, Mapping):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


__all__ = ["float_forward", "iter_batches", "measure"]
