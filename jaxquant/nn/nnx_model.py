"""``quantize_model`` for Flax NNX: a quantized copy of the user's module.

The copy (``nnx.clone``) keeps the model's class and its float ``nnx.Param`` s; every layer a
rule matches gets a quantized product through the hook NNX gives it (``nnx.Linear.dot_general``,
``nnx.LinearGeneral.dot_general``, ``nnx.Einsum.einsum_op``, ``nnx.Conv.conv_general_dilated``).
So ``qmodel(x)`` runs the quantized forward and ``nnx.state(qmodel, nnx.Param)`` holds the float
params it trains. :func:`to_serving_nnx` makes a serving copy whose quantized kernels are packed
QArrays held by :class:`QKernel` variables.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.core import QArray
from jaxquant.core.einsum_spec import parse_einsum
from jaxquant.nn.input_scale import INPUT_SCALE, ScaledInput, input_scale, input_scale_shape
from jaxquant.nn.layer_quant import (
    ConvOp,
    DotOp,
    EinsumOp,
    LayerPlan,
    Op,
    embed_attend,
    embed_lookup,
    embed_plan,
    expand_ellipsis,
    make_plan,
    promote_keep_qarray,
    unsupported_error,
)
from jaxquant.nn.quant_attention import NnxAttentionFn, attention_plan
from jaxquant.nn.rules import QuantRule, match_rule, warn_unused_rules

# NNX layer type -> (op, hook attribute, hook class attribute or None)
_NNX_LAYERS = {
    nnx.Linear: (Op.DOT, "dot_general", None),
    nnx.LinearGeneral: (Op.DOT, "dot_general", "dot_general_cls"),
    nnx.Einsum: (Op.EINSUM, "einsum_op", None),
    nnx.Conv: (Op.CONV, "conv_general_dilated", None),
}
_HOOKS = (DotOp, EinsumOp, ConvOp, ScaledInput)
# What a layer's hook is when its author did not set one (else quantize_model would replace it).
_DEFAULT_HOOKS = (None, jax.lax.dot_general, jax.lax.conv_general_dilated, jnp.einsum)


class QKernel(nnx.Variable):
    """A served kernel: holds a packed :class:`~jaxquant.core.QArray`; ``kernel[...]`` is the
    QArray itself (what the quantized hooks take)."""

    def __getitem__(self, key):
        value = self.get_value()
        if key is Ellipsis and isinstance(value, QArray):
            return value
        return super().__getitem__(key)


class InputScale(nnx.Variable):
    """A served layer's per-input-channel scale ``s`` (:mod:`jaxquant.nn.input_scale`): the
    layer divides its input by it before its quantized product (AWQ, SmoothQuant)."""


@functools.cache
def _scaled_class(cls: type) -> type:
    """A subclass of the layer class ``cls`` whose call makes ``self.input_scale`` the active
    input scale (read by its :class:`~jaxquant.nn.input_scale.ScaledInput` hook)."""

    def __call__(self, *args, **kwargs):
        with input_scale(self.input_scale[...]):
            return cls.__call__(self, *args, **kwargs)

    ns = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
          "__doc__": cls.__doc__}
    return type(cls)(cls.__name__, (cls,), ns)


def set_input_scales(served: nnx.Module, scales: Mapping[str, jax.Array]) -> None:
    """Gives layers of a serving copy an input scale, in place: ``served.<path>.input_scale`` an
    :class:`InputScale` of :func:`~jaxquant.nn.input_scale.input_scale_shape`, its product hook
    wrapped in :class:`~jaxquant.nn.input_scale.ScaledInput`.

    Args:
      served: a serving copy (:func:`to_serving_nnx`).
      scales: ``{path: s}`` for quantized dot / einsum / conv layers of ``served``.
    """
    scales = dict(scales)
    plans = layer_plans(served)
    for keys, node in nnx.iter_graph(served):
        path = _path(keys)
        if path not in scales or not isinstance(node, nnx.Module):
            continue
        plan, s = plans.get(path), jnp.asarray(scales.pop(path))
        if plan is None or plan.op not in (Op.DOT, Op.EINSUM, Op.CONV):
            raise ValueError(f"{path}: only a quantized dot, einsum or conv layer takes an "
                             "input scale.")
        if tuple(s.shape) != input_scale_shape(plan):
            raise ValueError(f"{path}: input scale {tuple(s.shape)} != "
                             f"{input_scale_shape(plan)}.")
        hook = _kind(node)[1]
        if not isinstance(getattr(node, hook), ScaledInput):
            setattr(node, hook, ScaledInput(getattr(node, hook)))
            object.__setattr__(node, "__class__", _scaled_class(type(node)))
        setattr(node, INPUT_SCALE, InputScale(s))
    if scales:
        raise ValueError(f"input scales given for paths that are no layer of this model: "
                         f"{sorted(scales)}.")


class QuantEmbed(nnx.Embed):
    """An ``nnx.Embed`` with a quantized table (``quantize_model`` sets it on the copy): the
    lookup gathers the rows' codes and dequantizes only them, ``attend`` is a quantized
    ``dot_general``. In training the table is a float ``nnx.Param`` (rows fake-quantized,
    straight-through); served it is a packed QArray in a :class:`QKernel`. ``jq_plan`` is the
    table's :class:`~jaxquant.nn.layer_quant.LayerPlan`."""

    def __call__(self, inputs, out_sharding=None):
        _no_sharding(self, out_sharding)
        return embed_lookup(self.jq_plan, self.embedding[...], inputs, self.dtype)

    def attend(self, query, out_sharding=None):
        _no_sharding(self, out_sharding)
        return embed_attend(self.jq_plan, self.embedding[...], query, self.dtype)


def _no_sharding(node, out_sharding) -> None:
    if out_sharding is not None:
        raise ValueError(
            f"{node.jq_plan.path}: out_sharding is not supported by the quantized embedding; "
            "shard its inputs instead."
        )


def _own_hook_error(path: str, layer: str, hook: str) -> ValueError:
    return ValueError(
        f"{path or '<root>'}: this {layer} sets its own {hook}, which quantize_model would "
        f"replace. Drop it, or put QuantRule(r'^{path}$', None) first to leave the layer as is."
    )


def _kind(node):
    for cls, v in _NNX_LAYERS.items():
        if isinstance(node, cls):
            return v
    return None


def _path(keys) -> str:
    return "/".join(str(k) for k in keys)


@dataclasses.dataclass(eq=False)
class _Recorder:
    """Records a layer's kernel shape and contracting axes on the example forward."""

    path: str
    layer: str
    op: Op
    config: object
    plans: dict

    def __call__(self, *args, **kwargs):
        if self.op is Op.EINSUM:
            eq, lhs, rhs = args[:3]
            axes = parse_einsum(expand_ellipsis(eq, lhs.ndim, rhs.ndim)).rhs_contracting
            self.plans[self.path] = make_plan(
                self.path, self.layer, self.op, rhs.shape, axes, self.config
            )
            return EinsumOp(self.plans[self.path])(*args, **kwargs)
        lhs, rhs = args[:2]
        if self.op is Op.CONV:
            axes = tuple(range(rhs.ndim - 1))
            self.plans[self.path] = make_plan(
                self.path, self.layer, self.op, rhs.shape, axes, self.config
            )
            return ConvOp(self.plans[self.path])(*args, **kwargs)
        dn = args[2] if len(args) > 2 else kwargs["dimension_numbers"]
        self.plans[self.path] = make_plan(
            self.path, self.layer, self.op, rhs.shape, dn[0][1], self.config
        )
        return DotOp(self.plans[self.path])(*args, **kwargs)


def quantize_nnx(model: nnx.Module, rules: tuple[QuantRule, ...], *args, **kwargs) -> nnx.Module:
    """A quantization-aware copy of ``model`` (see :func:`jaxquant.nn.any_model.quantize_model`)."""
    q = nnx.clone(model)
    plans: dict[str, LayerPlan] = {}
    hooked, weight_paths = [], []
    for keys, node in nnx.iter_graph(q):
        if not isinstance(node, nnx.Module):
            continue
        path = _path(keys)
        if any(isinstance(getattr(node, n, None), nnx.Param) for n in ("kernel", "embedding")):
            weight_paths.append(path)
        if isinstance(node, nnx.MultiHeadAttention):  # a rule may name it (no weights)
            weight_paths.append(path)
        m = match_rule(rules, path)
        if m is None or m[1].config is None:
            continue
        config, name = m[1].config, type(node).__name__
        if isinstance(node, nnx.Embed):
            plans[path] = embed_plan(path, name, node.num_embeddings, node.features, config)
            object.__setattr__(node, "__class__", QuantEmbed)
            node.jq_plan = plans[path]
            continue
        if isinstance(node, nnx.MultiHeadAttention):
            plan = attention_plan(path, name, config)
            if plan is not None:
                if node.attention_fn is not nnx.dot_product_attention:
                    raise ValueError(
                        f"{path}: the rule quantizes activations, but this {name} has its own "
                        "attention_fn, whose products cannot be quantized. Use "
                        f"nnx.dot_product_attention, or put QuantRule(r'^{path}$', None) first."
                    )
                node.attention_fn = NnxAttentionFn(plan)
                plans[path] = plan
            continue
        kind = _kind(node)
        if kind is None:
            if any(isinstance(getattr(node, n, None), nnx.Param) for n in ("kernel", "embedding")):
                raise unsupported_error(path, type(node).__name__, m[1])
            continue
        if getattr(node, "mask", None) is not None:
            raise unsupported_error(path, f"{type(node).__name__} with a mask", m[1])
        op, hook, hook_cls = kind
        current = getattr(node, hook, None)
        own_cls = hook_cls is not None and getattr(node, hook_cls, None) is not None
        if own_cls or not any(current is h for h in _DEFAULT_HOOKS):
            raise _own_hook_error(path, name, hook)
        setattr(node, hook, _Recorder(path, type(node).__name__, op, m[1].config, plans))
        if hook_cls is not None:
            setattr(node, hook_cls, None)
        hooked.append((path, node, op, hook))
    q.jaxquant_rules = QuantRules(rules)
    warn_unused_rules(rules, {*weight_paths, *plans})
    # One abstract forward finds each layer's kernel shape and contracting axes.
    nnx.eval_shape(lambda mod: mod(*args, **kwargs), q)
    for path, node, op, hook in hooked:
        if path not in plans:
            raise ValueError(
                f"{path}: a rule matches this {type(node).__name__}, but the model's forward on "
                "the example inputs never calls it, so its contracting axes are unknown. Pass "
                "inputs that reach it, or keep it float with QuantRule(r'^" + path + "$', None)."
            )
        fn = {Op.DOT: DotOp, Op.EINSUM: EinsumOp, Op.CONV: ConvOp}[op](plans[path])
        setattr(node, hook, fn)
    return q


@dataclasses.dataclass(frozen=True)
class QuantRules:
    """The rules a quantized NNX model was made with (static data on its root module)."""

    rules: tuple[QuantRule, ...]


def rules_of(qmodel: nnx.Module) -> tuple[QuantRule, ...]:
    """The rules of a model from :func:`quantize_nnx` (or its serving copy)."""
    held = getattr(qmodel, "jaxquant_rules", None)
    if not isinstance(held, QuantRules):
        raise ValueError(
            f"{type(qmodel).__name__} is not a model from jq.quantize_model; quantize it first."
        )
    return held.rules


def layer_plans(qmodel: nnx.Module) -> dict[str, LayerPlan]:
    """``{module path: LayerPlan}`` of a model from :func:`quantize_nnx` (group sizes used)."""
    out = {}
    for keys, node in nnx.iter_graph(qmodel):
        if isinstance(node, QuantEmbed):
            out[_path(keys)] = node.jq_plan
            continue
        if isinstance(node, nnx.MultiHeadAttention) and isinstance(
            node.attention_fn, NnxAttentionFn
        ):
            out[_path(keys)] = node.attention_fn.plan
            continue
        kind = _kind(node) if isinstance(node, nnx.Module) else None
        if kind is None:
            continue
        fn = getattr(node, kind[1], None)
        if isinstance(fn, _HOOKS):
            out[_path(keys)] = fn.plan
    return out


def to_serving_nnx(
    qmodel: nnx.Module,
    kernels: Mapping[str, QArray] | None = None,
    input_scales: Mapping[str, jax.Array] | None = None,
) -> nnx.Module:
    """A serving copy of a quantized NNX model: each quantized kernel a packed QArray in a
    :class:`QKernel` (no float copy), run by the same hooks. ``qmodel`` is unchanged.

    Args:
      qmodel: a model from ``quantize_model``.
      kernels: ``{path: QArray}`` kernels already quantized (by GPTQ, laid out as
        ``LayerPlan.quantize_kernel`` lays them out) used instead of rounding those layers'
        float kernels to nearest.
      input_scales: ``{path: s}``: those layers divide their input by ``s`` (AWQ, SmoothQuant:
        their ``kernels`` quantize ``W * s``); see :func:`set_input_scales`.

    Raises:
      ValueError: when ``qmodel`` has no quantized layer (not from ``quantize_model``).
    """
    kernels = dict(kernels or {})
    s = nnx.clone(qmodel)
    plans = layer_plans(s)
    if not plans:
        raise ValueError(
            "to_serving: this NNX model has no quantized layer; pass the model that "
            "jq.quantize_model returned."
        )
    for keys, node in nnx.iter_graph(s):
        path = _path(keys)
        if path not in plans or not isinstance(node, nnx.Module):
            continue
        plan = plans[path]
        if plan.op is Op.ATTENTION:  # no weight
            continue
        weight = getattr(node, plan.weight_name)
        if isinstance(weight, QKernel):
            continue
        q = kernels.pop(path, None)
        if q is None:
            q = plan.quantize_kernel(weight.get_value())
        elif tuple(q.shape) != plan.kernel_shape:
            raise ValueError(f"{path}: kernels[{path!r}] has shape {tuple(q.shape)}, the layer "
                             f"expects {plan.kernel_shape}.")
        setattr(node, plan.weight_name, QKernel(q))
        if plan.op is not Op.EMBED:
            node.promote_dtype = promote_keep_qarray
    if kernels:
        raise ValueError(f"to_serving: kernels given for layers that are not quantized float "
                         f"layers of this model: {sorted(kernels)}.")
    if input_scales:
        set_input_scales(s, input_scales)
    return s
