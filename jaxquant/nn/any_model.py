"""Quantize a Flax model as its author wrote it: ``jq.quantize_model(model, rules, *inputs)``.

One entry point for both Flax APIs (dispatch on the module type):

* a ``flax.linen.Module`` gives a module of the same class (a subclass made on the fly, same
  fields, same param tree; see :mod:`jaxquant.nn.linen_model`): ``qmodel.init`` /
  ``qmodel.apply`` work as on the model, with a quantized forward (QAT), and it nests in a larger
  model as any submodule does;
* a ``flax.nnx.Module`` gives a quantized copy of it (see :mod:`jaxquant.nn.nnx_model`).

:func:`to_serving` converts either kind to packed QArray weights, which the same model serves.
:func:`layer_plans` / :func:`report` give each quantized layer's plan (op, contracting axes,
config, the group size used).

Example (linen)::

    rules = [jq.QuantRule(r".*", jq.weight_only("int4", group_size=32))]
    qmodel = jq.quantize_model(model, rules, x)   # isinstance(qmodel, type(model))
    variables = qmodel.init(key, x)                # float params; the forward is quantized (QAT)
    serving = to_serving(qmodel, variables)        # packed int4 kernels
    logits = qmodel.apply(serving, x)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn

from jaxquant.nn.layer_quant import LayerPlan
from jaxquant.nn.linen_model import convert_linen, is_quantized_linen, quantize_linen
from jaxquant.nn.linen_model import layer_plans as linen_layer_plans
from jaxquant.nn.rules import QuantRule, check_rules


def quantize_model(model, rules: Sequence[QuantRule], *example_inputs, **example_kwargs):
    """Makes a Flax model quantization-aware, without touching its code.

    Args:
      model: a ``flax.linen.Module`` or a ``flax.nnx.Module``, as its author wrote it.
      rules: :class:`~jaxquant.nn.rules.QuantRule` s matched against module paths
        (``"Dense_0"``, ``"block/attn/query"``; first match wins; a None config keeps float).
      *example_inputs: what the model's ``__call__`` takes (traced abstractly) to find each
        layer's kernel shape and contracting axes.
      **example_kwargs: keyword arguments of ``__call__`` (e.g. ``train=False``).

    Returns:
      linen: a module of ``type(model)``'s kind (a subclass; same fields and param tree) whose
      forward is quantized. NNX: a quantized copy of ``model`` of the same class (the original
      is unchanged).

    Raises:
      ValueError: naming the module path, for a layer a rule matches but that cannot be
        quantized (an unsupported layer type, groups over several contracting axes, ...).
    """
    rules = check_rules(rules)
    if isinstance(model, nn.Module):
        return quantize_linen(model, rules, example_inputs, example_kwargs)
    from flax import nnx

    if isinstance(model, nnx.Module):
        from jaxquant.nn.nnx_model import quantize_nnx

        return quantize_nnx(model, rules, *example_inputs, **example_kwargs)
    raise ValueError(
        f"quantize_model takes a flax.linen.Module or a flax.nnx.Module, got "
        f"{type(model).__name__}."
    )


def to_serving(qmodel, variables: Mapping | None = None):
    """Serving form of a quantized model: packed QArray weights, no float copies.

    linen: ``to_serving(qmodel, variables)`` returns serving variables for ``qmodel.apply``.
    NNX: ``to_serving(qmodel)`` returns a serving copy (see
    :func:`jaxquant.nn.nnx_model.to_serving_nnx`).
    """
    if isinstance(qmodel, nn.Module):
        if variables is None:
            raise ValueError("to_serving(qmodel, variables): a linen model needs its variables.")
        return convert_linen(qmodel, variables)
    from jaxquant.nn.nnx_model import to_serving_nnx

    if variables is not None:
        raise ValueError(
            "to_serving(qmodel): an NNX model holds its own params; pass no variables."
        )
    return to_serving_nnx(qmodel)


def layer_plans(qmodel) -> dict[str, LayerPlan]:
    """``{module path: LayerPlan}`` of every quantized layer of a model from
    :func:`quantize_model` (linen or NNX): op, contracting axes, config, group size used."""
    if isinstance(qmodel, nn.Module):
        return linen_layer_plans(qmodel)
    from jaxquant.nn.nnx_model import layer_plans as nnx_layer_plans

    return nnx_layer_plans(qmodel)


def report(qmodel) -> str:
    """One line per quantized layer: path, layer, formats, group size used vs asked."""
    return "\n".join(p.describe() for p in layer_plans(qmodel).values())


__all__ = [
    "is_quantized_linen",
    "layer_plans",
    "quantize_model",
    "report",
    "to_serving",
]
