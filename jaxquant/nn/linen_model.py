"""``quantize_model`` for Flax linen: a module of the user's own class, quantization-aware.

:func:`quantize_linen` returns an instance of a subclass of ``type(model)`` made on the fly, with
the same field values: ``isinstance(qmodel, type(model))`` holds, ``init`` gives the same param
tree, ``apply`` / ``apply(..., method=...)`` / ``jax.jit`` and nesting as a submodule of a larger
model work as on ``model``. The subclass only wraps the model's methods: each runs under an
``nn.intercept_methods`` interceptor that gives the matched stock layers (``nn.Dense``,
``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv``) a quantized product. The model's code is not
edited, and its submodules are the stock ones. jaxquant's own float layers (``QDense``,
``QDenseGeneral``, ``QEinsum``, as jaxquant's :class:`~jaxquant.nn.Transformer` is built) are
matched too: the interceptor sets their ``config`` and ``mode`` for the call.

The plans (which layers, contracting axes, group sizes used) live on the subclass; read them
with :func:`layer_plans`. :func:`convert_linen` turns float variables into serving variables
(packed QArray kernels), which ``qmodel.apply`` serves on the same stock modules.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import types
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxquant.core import QArray
from jaxquant.core.einsum_spec import parse_einsum
from jaxquant.nn.input_scale import INPUT_SCALE, ScaledInput, divide, einsum_axes, input_scale
from jaxquant.nn.layer_quant import (
    ConvOp,
    DotOp,
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
from jaxquant.nn.linear import QEinsum, QuantizedLinear
from jaxquant.nn.modes import QuantMode
from jaxquant.nn.quant_attention import AttentionEinsum, attention_plan
from jaxquant.nn.rules import QuantRule, match_rule, warn_unused_rules

# jaxquant's own layers have no product hook: their config and mode fields are set instead.
NATIVE = "config"
# linen layer type -> (op, hook field, hook class field); Einsum has no hook (run here).
_LINEN_LAYERS = {
    QEinsum: (Op.EINSUM, NATIVE, None),
    QuantizedLinear: (Op.DOT, NATIVE, None),
    nn.Dense: (Op.DOT, "dot_general", "dot_general_cls"),
    nn.DenseGeneral: (Op.DOT, "dot_general", "dot_general_cls"),
    nn.Conv: (Op.CONV, "conv_general_dilated", "conv_general_dilated_cls"),
    nn.Einsum: (Op.EINSUM, None, None),
    nn.Embed: (Op.EMBED, None, None),
    nn.MultiHeadDotProductAttention: (Op.ATTENTION, None, None),
}
_ATTENTION_HOOKS = ("qk_attn_weights_einsum_cls", "attn_weights_value_einsum_cls")
_WEIGHT_NAMES = ("kernel", "embedding")
# Methods of Module that enter a model from the outside (the interceptor wraps them too).
_ENTRY_POINTS = ("apply", "init", "init_with_output")


def is_quantized_linen(module: Any) -> bool:
    """Whether ``module`` is a linen module returned by ``quantize_model``."""
    return isinstance(module, nn.Module) and "_jaxquant_plans" in vars(type(module))


def layer_plans(qmodel: nn.Module) -> dict[str, LayerPlan]:
    """``{module path: LayerPlan}`` of the quantized layers (paths relative to ``qmodel``)."""
    if not is_quantized_linen(qmodel):
        raise ValueError(
            f"{type(qmodel).__name__} is not a model from jq.quantize_model; quantize it first."
        )
    return dict(type(qmodel)._jaxquant_plans)


def quantize_linen(model: nn.Module, rules: tuple[QuantRule, ...], args, kwargs) -> nn.Module:
    """See :func:`jaxquant.nn.any_model.quantize_model` (linen)."""
    base = vars(type(model)).get("_jaxquant_base", type(model))
    plain = _clone_as(model, base)  # re-quantizing a quantized model starts from its class
    plans = _plan_linen(plain, rules, args, kwargs)
    return _clone_as(model, _quantized_class(base, rules, plans))


def convert_linen(qmodel: nn.Module, variables: Mapping) -> dict:
    """Serving variables: every quantized layer's kernel a packed QArray (int4: two codes a
    byte), everything else as given. ``qmodel.apply`` serves them.

    Args:
      qmodel: a model from ``quantize_model``.
      variables: ``{"params": ..., ...}`` as ``qmodel.init`` returns them (float kernels).
    """
    plans = layer_plans(qmodel)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("to_serving(qmodel, variables) takes the variables dict, {'params': ...}.")
    flat = traverse_util.flatten_dict(_as_dict(variables["params"]))
    for path, plan in plans.items():
        if plan.op is Op.ATTENTION:  # no weight
            continue
        key = (*(p for p in path.split("/") if p), plan.weight_name)
        if key not in flat:
            raise ValueError(f"{path}: no {plan.weight_name} at params/{'/'.join(key)} to convert.")
        if isinstance(flat[key], QArray):
            continue
        flat[key] = plan.quantize_kernel(flat[key])
    return {**dict(variables), "params": traverse_util.unflatten_dict(flat)}


def float_linen(qmodel: nn.Module) -> nn.Module:
    """The float model ``qmodel`` was made from: the user's class with ``qmodel``'s fields
    (same param tree; its forward is the author's, unquantized)."""
    if not is_quantized_linen(qmodel):
        raise ValueError(
            f"{type(qmodel).__name__} is not a model from jq.quantize_model; quantize it first."
        )
    return _clone_as(qmodel, type(qmodel)._jaxquant_base)


# --- the subclass ------------------------------------------------------------------------------


def _clone_as(model: nn.Module, cls: type) -> nn.Module:
    """An unbound ``cls`` with ``model``'s field values (as ``Module.clone`` builds one)."""
    import dataclasses

    attrs = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init}
    attrs["parent"] = None
    return cls(**attrs)


def _quantized_class(base: type, rules, plans: dict[str, LayerPlan]) -> type:
    """A subclass of ``base`` whose methods run under the quantizing interceptor.

    It keeps ``base``'s name (so a parent names it as it would name ``base``: the param tree is
    the same) and adds no dataclass field.
    """
    ns: dict[str, Any] = {
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "_jaxquant_base": base,
        "_jaxquant_rules": tuple(rules),
        "_jaxquant_plans": types.MappingProxyType(dict(plans)),
    }
    for name in _user_methods(base):
        ns[name] = _quantizing_method(getattr(base, name), name, entry=False)
    for name in _ENTRY_POINTS:
        ns[name] = _quantizing_method(getattr(base, name), name, entry=True)
    return type(base)(base.__name__, (base,), ns)


def _user_methods(base: type) -> list[str]:
    """Methods defined by ``base`` and its classes below ``nn.Module`` (``__call__`` and named
    methods; not ``setup``, helpers marked ``nn.nowrap``, static or class methods, fields)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(base)}
    names = set()
    for klass in base.__mro__:
        if klass is nn.Module or not issubclass(klass, nn.Module):
            continue
        for name, value in vars(klass).items():
            if name in fields or name == "setup" or name in _ENTRY_POINTS:
                continue
            if name.startswith("__") and name != "__call__":
                continue
            if not isinstance(value, types.FunctionType) or hasattr(value, "nowrap"):
                continue
            names.add(name)
    return sorted(names)


def _quantizing_method(fn, name: str, *, entry: bool):
    def method(self, *args, **kwargs):
        if entry:
            prefix = ()
        elif self.scope is None:  # unbound: Flax raises its own error
            return fn(self, *args, **kwargs)
        else:
            prefix = tuple(self.path)
        with _quantizing(type(self), prefix):
            return fn(self, *args, **kwargs)

    method.__name__ = name
    method.__qualname__ = f"{getattr(fn, '__qualname__', name)}"
    method.__doc__ = fn.__doc__
    return nn.nowrap(method)


_ACTIVE = threading.local()


@contextlib.contextmanager
def _quantizing(cls: type, prefix: tuple):
    """Runs the block under ``cls``'s interceptor for the model at ``prefix`` (once)."""
    active = _ACTIVE.__dict__.setdefault("stack", [])
    key = (cls, prefix)
    if key in active:
        yield
        return
    active.append(key)
    try:
        with nn.intercept_methods(_Interceptor(cls._jaxquant_plans, prefix)):
            yield
    finally:
        active.pop()


# --- planning: one abstract init records every matched layer -----------------------------------


def _layer_kind(mod):
    for cls, v in _LINEN_LAYERS.items():
        if isinstance(mod, cls):
            return cls, v
    return None, None


def _einsum_str(mod: nn.Einsum, args, kwargs) -> str:
    """The call's equation (its argument, else the module's), ``...`` spelled out."""
    eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    eq = eq if eq is not None else mod.einsum_str
    x = args[0] if args else kwargs["inputs"]
    return expand_ellipsis(eq, jnp.ndim(x), len(mod.shape))


def _path(mod: nn.Module, prefix: tuple = ()) -> str | None:
    """``mod``'s ``'/'``-joined path below ``prefix``, or None when it is not below it."""
    path = tuple(mod.path)
    if path[: len(prefix)] != prefix:
        return None
    return "/".join(str(p) for p in path[len(prefix) :])


@contextlib.contextmanager
def _patched(mod, attrs: Mapping[str, Any]):
    """Sets attributes on a (frozen) linen module for one call, and restores them."""
    saved = {k: mod.__dict__[k] for k in attrs if k in mod.__dict__}
    for k, v in attrs.items():
        object.__setattr__(mod, k, v)
    try:
        yield
    finally:
        for k in attrs:
            if k in saved:
                object.__setattr__(mod, k, saved[k])
            else:
                object.__delattr__(mod, k)


def _plan_linen(model, rules, args, kwargs) -> dict[str, LayerPlan]:
    seen: dict[str, str] = {}  # path -> layer class name, for every module called
    plans: dict[str, LayerPlan] = {}
    attentions: set[str] = set()  # attention layers (a rule may name them: no weights)

    def record(next_fun, fargs, fkwargs, ctx):
        mod = ctx.module
        if ctx.method_name not in ("__call__", "attend"):
            return next_fun(*fargs, **fkwargs)
        path = _path(mod)
        seen.setdefault(path, type(mod).__name__)
        cls, kind = _layer_kind(mod)
        if kind is not None and kind[0] is Op.ATTENTION:
            attentions.add(path)
        m = match_rule(rules, path)
        if cls is None or m is None or m[1].config is None:
            return next_fun(*fargs, **fkwargs)
        config, name = m[1].config, type(mod).__name__
        op, hook, hook_cls = kind
        if op is Op.EMBED:
            plans[path] = embed_plan(path, name, mod.num_embeddings, mod.features, config)
            return next_fun(*fargs, **fkwargs)
        if ctx.method_name != "__call__":
            return next_fun(*fargs, **fkwargs)
        if hook == NATIVE:
            _check_native(mod, path, name)
            out = next_fun(*fargs, **fkwargs)
            kernel = mod.get_variable("params", "kernel")
            axes = mod.kernel_contracting_axes(fargs[0] if fargs else fkwargs["x"])  # what the layer's own CONVERT quantizes
            plans[path] = make_plan(path, name, op, kernel.shape, axes, config)
            return out
        if op is Op.ATTENTION:
            plan = attention_plan(path, name, config)
            if plan is not None:
                _check_attention(mod, path)
                plans[path] = plan
            return next_fun(*fargs, **fkwargs)
        if op is Op.EINSUM:
            eq = _einsum_str(mod, fargs, fkwargs)
            axes = parse_einsum(eq).rhs_contracting
            plans[path] = make_plan(path, name, op, mod.shape, axes, config)
            return next_fun(*fargs, **fkwargs)
        if getattr(mod, "mask", None) is not None:
            raise unsupported_error(path, f"{name} with a mask", m[1])
        if getattr(mod, hook, None) is not None or getattr(mod, hook_cls, None) is not None:
            raise _own_hook_error(path, name, hook)

        def recorder(lhs, rhs, *a, **k):
            if op is Op.CONV:
                axes = tuple(range(rhs.ndim - 1))
                plans[path] = make_plan(path, name, op, rhs.shape, axes, config)
                return jax.lax.conv_general_dilated(lhs, rhs, *a, **k)
            dn = a[0] if a else k["dimension_numbers"]
            plans[path] = make_plan(path, name, op, rhs.shape, dn[0][1], config)
            k.pop("out_sharding", None)
            return jax.lax.dot_general(lhs, rhs, *a, **k)

        with _patched(mod, {hook: recorder, hook_cls: None}):
            return next_fun(*fargs, **fkwargs)

    def init():
        with nn.intercept_methods(record):
            return model.init(jax.random.key(0), *args, **kwargs)

    shapes = jax.eval_shape(init)
    flat = traverse_util.flatten_dict(_as_dict(shapes.get("params", {})))
    owners = sorted({"/".join(map(str, k[:-1])) for k in flat if k[-1] in _WEIGHT_NAMES})
    for path in owners:
        m = match_rule(rules, path)
        if m is not None and m[1].config is not None and path not in plans:
            raise unsupported_error(path, seen.get(path, "module"), m[1])
    warn_unused_rules(rules, {*owners, *plans, *attentions})
    return plans


def _check_native(mod: QuantizedLinear, path: str, name: str) -> None:
    """A jaxquant layer a rule matches must be float as built (the rule gives its config)."""
    if mod.config is not None or mod.learned_scale or mod.static_activation is not None:
        raise ValueError(
            f"{path}: this {name} is already quantized by its own config; quantize_model "
            "quantizes float models. Build it with config=None (e.g. a TransformerConfig "
            f"without quant_rules), or put QuantRule(r'^{path}$', None) first to leave it as is."
        )
    if mod.mode != QuantMode.TRAIN:
        raise ValueError(
            f"{path}: this {name} is in mode {mod.mode.name}; quantize_model takes the float "
            "model in TRAIN mode (it serves with the same model)."
        )


def _own_hook_error(path: str, layer: str, hook: str) -> ValueError:
    return ValueError(
        f"{path or '<root>'}: this {layer} sets its own {hook}, which quantize_model would "
        f"replace. Drop it, or put QuantRule(r'^{path}$', None) first to leave the layer as is."
    )


def _as_dict(tree):
    if isinstance(tree, Mapping):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


# --- running: the interceptor ------------------------------------------------------------------


class _Interceptor:
    """Gives the planned layers below ``prefix`` their quantized product (float kernels: QAT;
    QArray kernels: serving)."""

    def __init__(self, plans: Mapping[str, LayerPlan], prefix: tuple):
        self.plans = plans
        self.prefix = prefix

    def __call__(self, next_fun, args, kwargs, ctx):
        mod = ctx.module
        cls, kind = _layer_kind(mod)
        if cls is None or ctx.method_name not in ("__call__", "attend", "setup"):
            return next_fun(*args, **kwargs)
        path = _path(mod, self.prefix)
        plan = None if path is None else self.plans.get(path)
        if plan is None:
            return next_fun(*args, **kwargs)
        op, hook, hook_cls = kind
        if op is Op.EMBED:
            return _linen_embed(mod, plan, next_fun, args, kwargs, ctx.method_name)
        if ctx.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if op is Op.ATTENTION:
            hooks = {h: functools.partial(AttentionEinsum, plan) for h in _ATTENTION_HOOKS}
            with _patched(mod, hooks):
                return next_fun(*args, **kwargs)
        stored = (
            mod.get_variable("params", "kernel") if mod.has_variable("params", "kernel") else None
        )
        served = isinstance(stored, QArray)
        scale = None  # AWQ / SmoothQuant: the input is divided by it (jaxquant.nn.input_scale)
        if mod.has_variable("params", INPUT_SCALE):
            scale = mod.get_variable("params", INPUT_SCALE)
        if hook == NATIVE:
            return _linen_native(mod, plan, served, args, kwargs, scale, next_fun)
        if op is Op.EINSUM:
            return _linen_einsum(mod, plan, stored if served else None, args, kwargs, scale)
        hook_fn = ConvOp(plan) if op is Op.CONV else DotOp(plan)
        attrs = {hook: hook_fn if scale is None else ScaledInput(hook_fn), hook_cls: None}
        if served:
            attrs["param"] = _served_param(mod, plan, stored)
            attrs["promote_dtype"] = promote_keep_qarray
        scaling = contextlib.nullcontext() if scale is None else input_scale(scale)
        with _patched(mod, attrs), scaling:
            return next_fun(*args, **kwargs)


def _check_attention(mod: nn.MultiHeadDotProductAttention, path: str) -> None:
    """Raises naming ``path`` when the attention products cannot be given quantized einsums."""
    params = inspect.signature(mod.attention_fn).parameters
    if not all(k in params for k in ("qk_attn_weights_einsum", "attn_weights_value_einsum")):
        raise ValueError(
            f"{path}: the rule quantizes activations, but this {type(mod).__name__}'s "
            "attention_fn takes no qk_attn_weights_einsum / attn_weights_value_einsum, so its "
            "products cannot be quantized. Use Flax's dot_product_attention, or a rule "
            f"QuantRule(r'^{path}$', None) first to keep them float."
        )
    if mod.precision is not None or any(getattr(mod, h) is not None for h in _ATTENTION_HOOKS):
        raise ValueError(
            f"{path}: the rule quantizes the attention products, but this "
            f"{type(mod).__name__} sets precision or its own einsums for them. Drop them, or "
            f"put QuantRule(r'^{path}$', None) first to keep the products float."
        )


def _linen_embed(mod: nn.Embed, plan: LayerPlan, next_fun, args, kwargs, method: str):
    if method == "setup":
        table = mod.scope.get_variable("params", "embedding") if mod.scope else None
        if not isinstance(table, QArray):
            return next_fun(*args, **kwargs)
        if tuple(table.shape) != plan.kernel_shape:
            raise ValueError(
                f"{plan.path}: the served embedding has shape {table.shape}, the layer expects "
                f"{plan.kernel_shape}."
            )
        mod.embedding = table  # skips the param's shape check (packed codes)
        return None
    x = kwargs.pop("inputs", None) if not args else args[0]
    x = kwargs.pop("query", x)
    if kwargs or len(args) > 1:
        raise ValueError(f"{plan.path}: unexpected arguments to Embed.{method}.")
    if method == "attend":
        return embed_attend(plan, mod.embedding, x, mod.dtype)
    return embed_lookup(plan, mod.embedding, x, mod.dtype)


def _served_param(mod, plan: LayerPlan, q: QArray):
    """``Module.param`` that returns the served QArray kernel (the shape check on its packed
    codes would fail) after checking its logical shape."""

    def param(name, init_fn, *init_args, **init_kwargs):
        if name != "kernel":
            return type(mod).param(mod, name, init_fn, *init_args, **init_kwargs)
        if tuple(q.shape) != plan.kernel_shape:
            raise ValueError(
                f"{plan.path}: the served kernel has shape {q.shape}, the layer expects "
                f"{plan.kernel_shape}."
            )
        return q

    return param


def _linen_native(mod: QuantizedLinear, plan: LayerPlan, served: bool, args, kwargs, scale,
                  next_fun):
    """A jaxquant layer: the plan's config, TRAIN on float kernels (QAT) or SERVE on a QArray
    kernel, its input divided by the input scale first when there is one."""
    if scale is not None:
        x = args[0] if args else kwargs.pop("x")
        axes = (einsum_axes(plan, mod.einsum_str, x) if isinstance(mod, QEinsum)
                else mod.dimension_numbers(x.ndim)[0][0])
        x = divide(plan, x, scale, axes)
        args = (x, *args[1:])
    mode = QuantMode.SERVE if served else QuantMode.TRAIN
    with _patched(mod, {"config": plan.config, "mode": mode}):
        return next_fun(*args, **kwargs)


def _linen_einsum(mod: nn.Einsum, plan: LayerPlan, served: QArray | None, args, kwargs, scale):
    from jaxquant.core.dot_general import einsum

    x = args[0]
    eq = _einsum_str(mod, args, kwargs)
    if scale is not None:
        x = divide(plan, x, scale, einsum_axes(plan, eq, x))
    kernel = served
    if kernel is None:
        kernel = mod.param("kernel", mod.kernel_init, mod.shape, mod.param_dtype)
    elif tuple(kernel.shape) != plan.kernel_shape:
        raise ValueError(f"{plan.path}: served kernel {kernel.shape} != {plan.kernel_shape}.")
    bias = None
    spec = parse_einsum(eq)
    bshape, bbroadcast = spec.rhs_in_output(plan.kernel_shape)
    if mod.use_bias:
        bias = mod.param("bias", mod.bias_init, bshape, mod.param_dtype)
    x, kernel, bias = promote_keep_qarray(x, kernel, bias, dtype=mod.dtype)
    y = einsum(
        eq,
        x,
        kernel,
        config=plan.config,
        precision=mod.precision,
        preferred_element_type=mod.preferred_element_type,
    )
    if bias is not None:
        y = y + bias.reshape(bbroadcast)
    return y
