"""Quantize a Flax model as its author wrote it: ``jq.quantize_model(model, rules, *inputs)``.

One entry point for both Flax APIs (dispatch on the module type):

* a ``flax.linen.Module`` gives a :class:`QuantizedLinen`: ``init`` / ``apply`` as on the model
  (same param tree), with a quantized forward (QAT) for ``nn.Dense``, ``nn.DenseGeneral``,
  ``nn.Einsum`` and ``nn.Conv``, run through ``nn.intercept_methods`` (the model's code is
  untouched). ``qmodel.convert(variables)`` packs the kernels into QArrays, and
  ``qmodel.apply(serving_variables, x)`` serves them on the same stock modules;
* a ``flax.nnx.Module`` gives a quantized copy of it (see :mod:`jaxquant.nn.nnx_model`).

:func:`to_serving` converts either kind. Each matched layer's plan (op, contracting axes,
config, the group size used) is in ``qmodel.layers`` (linen) / :func:`layer_plans` (NNX).

Example (linen)::

    rules = [jq.QuantRule(r".*", jq.weight_only("int4", group_size=32))]
    qmodel = jq.quantize_model(model, rules, x)
    variables = qmodel.init(key, x)            # float params; the forward is quantized (QAT)
    serving = qmodel.convert(variables)        # packed int4 kernels
    logits = qmodel.apply(serving, x)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

from jaxquant.core import QArray
from jaxquant.core.einsum_spec import parse_einsum
from jaxquant.nn.layer_quant import (
    ConvOp,
    DotOp,
    LayerPlan,
    Op,
    make_plan,
    promote_keep_qarray,
)
from jaxquant.nn.rules import QuantRule, match_rule, module_path

# linen layer type -> (op, hook field, hook class field); Einsum has no hook (run here).
_LINEN_LAYERS = {
    nn.Dense: (Op.DOT, "dot_general", "dot_general_cls"),
    nn.DenseGeneral: (Op.DOT, "dot_general", "dot_general_cls"),
    nn.Conv: (Op.CONV, "conv_general_dilated", "conv_general_dilated_cls"),
    nn.Einsum: (Op.EINSUM, None, None),
}
_WEIGHT_NAMES = ("kernel", "embedding")
SUPPORTED = "Dense, DenseGeneral, Einsum, Conv (linen); Linear, LinearGeneral, Einsum, Conv (NNX)"


def check_rules(rules: Sequence[QuantRule]) -> tuple[QuantRule, ...]:
    if isinstance(rules, QuantRule):
        rules = (rules,)
    rules = tuple(rules)
    for r in rules:
        if not isinstance(r, QuantRule):
            raise ValueError(
                f"rules must be QuantRule objects, got {type(r).__name__}: build them as "
                "jq.QuantRule(pattern, config)."
            )
    return rules


def warn_unused_rules(rules: tuple[QuantRule, ...], weight_paths) -> None:
    """A ``UserWarning`` for rules that are the first match of no weight-holding layer (a typo
    in a pattern, or a rule shadowed by an earlier one)."""
    used = {m[0] for p in weight_paths if (m := match_rule(rules, p)) is not None}
    unused = [r.pattern for i, r in enumerate(rules) if i not in used]
    if unused:
        warnings.warn(
            f"quantize_model: rules matched no layer: {unused}. Layer paths: "
            f"{sorted(weight_paths)[:12]}.",
            stacklevel=3,
        )


def unsupported_error(path: str, layer: str, rule: QuantRule) -> ValueError:
    return ValueError(
        f"{path or '<root>'}: rule {rule.pattern!r} matches this {layer}, which quantize_model "
        f"cannot quantize (supported so far: {SUPPORTED}). Put QuantRule(r'^{path}$', None) "
        "first in the rules to keep it float."
    )


def quantize_model(model, rules: Sequence[QuantRule], *example_inputs, **example_kwargs):
    """Makes a Flax model quantization-aware, without touching its code.

    Args:
      model: a ``flax.linen.Module`` or a ``flax.nnx.Module``, as its author wrote it.
      rules: :class:`~jaxquant.nn.rules.QuantRule` s matched against module paths
        (``"Dense_0"``, ``"block/attn/query"``; first match wins; a None config keeps float).
      *example_inputs: what the model's ``__call__`` takes (traced abstractly for linen, run
        once for NNX) to find each layer's kernel shape and contracting axes.
      **example_kwargs: keyword arguments of ``__call__`` (e.g. ``train=False``).

    Returns:
      linen: a :class:`QuantizedLinen` (``init`` / ``apply`` / ``convert``). NNX: a quantized
      copy of ``model`` of the same class (the original is unchanged).

    Raises:
      ValueError: naming the module path, for a layer a rule matches but that cannot be
        quantized (an unsupported layer type, groups over several contracting axes, ...).
    """
    rules = check_rules(rules)
    if isinstance(model, nn.Module):
        plans = _plan_linen(model, rules, example_inputs, example_kwargs)
        return QuantizedLinen(model, rules, plans)
    from flax import nnx

    if isinstance(model, nnx.Module):
        from jaxquant.nn.nnx_model import quantize_nnx

        return quantize_nnx(model, rules, *example_inputs, **example_kwargs)
    raise ValueError(
        f"quantize_model takes a flax.linen.Module or a flax.nnx.Module, got "
        f"{type(model).__name__}."
    )


def to_serving(qmodel, variables: Mapping | None = None):
    """Serving form of a quantized model: packed QArray kernels, no float copies.

    linen: ``to_serving(qmodel, variables)`` is ``qmodel.convert(variables)``. NNX:
    ``to_serving(qmodel)`` returns a serving copy (see :func:`jaxquant.nn.nnx_model.to_serving_nnx`).
    """
    if isinstance(qmodel, QuantizedLinen):
        if variables is None:
            raise ValueError("to_serving(qmodel, variables): a linen model needs its variables.")
        return qmodel.convert(variables)
    from jaxquant.nn.nnx_model import to_serving_nnx

    if variables is not None:
        raise ValueError(
            "to_serving(qmodel): an NNX model holds its own params; pass no variables."
        )
    return to_serving_nnx(qmodel)


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


def _layer_kind(mod):
    for cls, v in _LINEN_LAYERS.items():
        if isinstance(mod, cls):
            return cls, v
    return None, None


def _einsum_str(mod: nn.Einsum, args, kwargs) -> str:
    eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    return (eq if eq is not None else mod.einsum_str).replace(" ", "")


def _plan_linen(model, rules, args, kwargs) -> dict[str, LayerPlan]:
    seen: dict[str, str] = {}  # path -> layer class name, for every module called
    plans: dict[str, LayerPlan] = {}

    def record(next_fun, fargs, fkwargs, ctx):
        mod = ctx.module
        if ctx.method_name != "__call__":
            return next_fun(*fargs, **fkwargs)
        path = module_path(mod)
        seen.setdefault(path, type(mod).__name__)
        cls, kind = _layer_kind(mod)
        m = match_rule(rules, path)
        if cls is None or m is None or m[1].config is None:
            return next_fun(*fargs, **fkwargs)
        config, name = m[1].config, type(mod).__name__
        op, hook, hook_cls = kind
        if op is Op.EINSUM:
            eq = _einsum_str(mod, fargs, fkwargs)
            axes = parse_einsum(eq).rhs_contracting
            plans[path] = make_plan(path, name, op, mod.shape, axes, config)
            return next_fun(*fargs, **fkwargs)
        if getattr(mod, "mask", None) is not None:
            raise unsupported_error(path, f"{name} with a mask", m[1])

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
    warn_unused_rules(rules, owners)
    return plans


def _as_dict(tree):
    if isinstance(tree, Mapping):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


class QuantizedLinen:
    """A linen model with a quantized forward: what :func:`quantize_model` returns for linen.

    ``init`` and ``apply`` take and return what the model's do (the same param tree). With
    float params the forward is quantization-aware (QAT: quantized products, straight-through
    gradients to the float params); with the params of :meth:`convert` (packed QArray kernels)
    the same stock modules serve them.

    Attributes:
      module: the user's model (unchanged).
      rules: the rules.
      layers: ``{module path: LayerPlan}`` for every quantized layer (group sizes used).
    """

    def __init__(self, module: nn.Module, rules: tuple[QuantRule, ...], layers):
        self.module = module
        self.rules = rules
        self.layers: dict[str, LayerPlan] = dict(layers)

    def __repr__(self) -> str:
        return f"QuantizedLinen({type(self.module).__name__}, {len(self.layers)} quantized layers)"

    def report(self) -> str:
        """One line per quantized layer: path, layer, formats, group size used vs asked."""
        return "\n".join(p.describe() for p in self.layers.values())

    def init(self, rngs, *args, **kwargs):
        with nn.intercept_methods(self._interceptor):
            return self.module.init(rngs, *args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        with nn.intercept_methods(self._interceptor):
            return self.module.apply(variables, *args, **kwargs)

    def convert(self, variables: Mapping) -> dict:
        """Serving variables: every quantized layer's kernel a packed QArray (int4: two codes a
        byte), everything else as given. Serve them with ``apply``.

        Args:
          variables: ``{"params": ..., ...}`` as ``init`` returns them (float kernels).
        """
        if "params" not in variables:
            raise ValueError("convert(variables) takes the variables dict, {'params': ...}.")
        flat = traverse_util.flatten_dict(_as_dict(variables["params"]))
        for path, plan in self.layers.items():
            key = (*(p for p in path.split("/") if p), "kernel")
            if key not in flat:
                raise ValueError(f"{path}: no kernel at params/{'/'.join(key)} to convert.")
            if isinstance(flat[key], QArray):
                continue
            flat[key] = plan.quantize_kernel(flat[key])
        return {**dict(variables), "params": traverse_util.unflatten_dict(flat)}

    def _interceptor(self, next_fun, args, kwargs, ctx):
        mod = ctx.module
        if ctx.method_name != "__call__":
            return next_fun(*args, **kwargs)
        cls, kind = _layer_kind(mod)
        if cls is None:
            return next_fun(*args, **kwargs)
        path = module_path(mod)
        plan = self.layers.get(path)
        if plan is None:
            return next_fun(*args, **kwargs)
        op, hook, hook_cls = kind
        stored = (
            mod.get_variable("params", "kernel") if mod.has_variable("params", "kernel") else None
        )
        served = isinstance(stored, QArray)
        if op is Op.EINSUM:
            return _linen_einsum(mod, plan, stored if served else None, args, kwargs)
        hook_fn = ConvOp(plan) if op is Op.CONV else DotOp(plan)
        attrs = {hook: hook_fn, hook_cls: None}
        if served:
            attrs["param"] = _served_param(mod, plan, stored)
            attrs["promote_dtype"] = promote_keep_qarray
        with _patched(mod, attrs):
            return next_fun(*args, **kwargs)


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


def _linen_einsum(mod: nn.Einsum, plan: LayerPlan, served: QArray | None, args, kwargs):
    from jaxquant.core.dot_general import einsum

    x = args[0]
    eq = _einsum_str(mod, args, kwargs)
    if "..." in eq:
        raise ValueError(f"{plan.path}: an nn.Einsum equation with '...' is not supported yet.")
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
