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

import json
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
from flax import traverse_util

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
        quantized (an unsupported layer type, a config the layer can't take, ...).
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


# --- saving: serving params + rules -----------------------------------------------------------

SIDECAR = "quantize_model.json"
_FORMAT = "jaxquant.quantize_model/1"


def save_serving(
    directory: str | os.PathLike, qmodel, variables: Mapping | None = None, *, force=False
) -> pathlib.Path:
    """Saves a quantized model's serving params and its rules.

    ``directory/params`` is a :mod:`jaxquant.checkpoint` (packed QArrays as codes and scales,
    and the ``input_scale`` of layers that have one: AWQ, SmoothQuant);
    ``directory/quantize_model.json`` holds the rules (``QuantRule.to_dict``) and each layer's
    plan (shape, group size used), so :func:`restore_serving` rebuilds the served model from
    the model's code alone.

    Args:
      directory: a new directory (or an existing one of this kind with ``force``).
      qmodel: linen: a model from :func:`quantize_model`; NNX: it or its serving copy.
      variables: linen: the variables (float ones are converted with :func:`to_serving`).
        NNX: None.
      force: replace what is at ``directory``.

    Returns:
      The directory written.
    """
    from jaxquant import checkpoint

    directory = pathlib.Path(directory).absolute()
    plans = layer_plans(qmodel)
    if isinstance(qmodel, nn.Module):
        api, rules = "linen", type(qmodel)._jaxquant_rules
        tree = to_serving(qmodel, variables)
    else:
        from flax import nnx

        from jaxquant.nn.nnx_model import QKernel, rules_of

        api, rules = "nnx", rules_of(qmodel)
        if variables is not None:
            raise ValueError("save_serving(dir, qmodel): an NNX model holds its own params.")
        served = qmodel if jax.tree.leaves(nnx.state(qmodel, QKernel)) else to_serving(qmodel)
        tree = nnx.to_pure_dict(nnx.state(served, nnx.Not(nnx.RngState)))
    if directory.exists() and not force:
        raise FileExistsError(f"{directory} exists; pass force=True to replace it.")
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint.save(directory / "params", tree, force=force)
    meta = {
        "format": _FORMAT,
        "api": api,
        "model": type(qmodel).__qualname__,
        "rules": [r.to_dict() for r in rules],
        "layers": {p: plan.to_dict() for p, plan in plans.items()},
    }
    tmp = directory / (SIDECAR + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(directory / SIDECAR)
    return directory


def read_rules(directory: str | os.PathLike) -> tuple[QuantRule, ...]:
    """The rules saved by :func:`save_serving` in ``directory``."""
    return tuple(QuantRule.from_dict(r) for r in _read_meta(directory)["rules"])


def restore_serving(directory: str | os.PathLike, model, *example_inputs, **example_kwargs):
    """The served model saved by :func:`save_serving`, rebuilt on ``model`` (the float model as
    its author wrote it; its weights are not used).

    Returns:
      linen: ``(qmodel, serving_variables)``: serve with ``qmodel.apply(serving_variables, x)``.
      NNX: the serving module.

    Raises:
      ValueError: when the saved layers do not match what the rules give on ``model`` (another
        model, or other example input shapes).
    """
    from jaxquant import checkpoint

    meta = _read_meta(directory)
    rules = tuple(QuantRule.from_dict(r) for r in meta["rules"])
    with warnings.catch_warnings():  # an unused rule was reported when it was saved
        warnings.simplefilter("ignore", UserWarning)
        qmodel = quantize_model(model, rules, *example_inputs, **example_kwargs)
    plans = {p: plan.to_dict() for p, plan in layer_plans(qmodel).items()}
    saved = meta["layers"]
    diff = sorted(p for p in {*plans, *saved} if plans.get(p) != saved.get(p))
    if diff:
        raise ValueError(
            f"{directory}: the saved layers differ from what its rules give on this "
            f"{type(model).__name__} (layers {diff[:4]}). Restore onto the model and "
            "example input shapes it was saved from."
        )
    tree = checkpoint.restore(pathlib.Path(directory) / "params")
    if isinstance(model, nn.Module):
        return qmodel, tree
    from flax import nnx

    from jaxquant.nn.input_scale import INPUT_SCALE
    from jaxquant.nn.nnx_model import set_input_scales

    served = to_serving(qmodel)
    flat = traverse_util.flatten_dict(tree)  # layers saved with an input scale (AWQ, ...)
    scales = {"/".join(map(str, k[:-1])): v for k, v in flat.items() if k[-1] == INPUT_SCALE}
    set_input_scales(served, scales)
    state = nnx.state(served, nnx.Not(nnx.RngState))
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(served, state)
    return served


def _read_meta(directory) -> dict:
    path = pathlib.Path(directory) / SIDECAR
    if not path.is_file():
        raise ValueError(
            f"{directory} has no {SIDECAR}: not a model saved by jaxquant.nn.any_model.save_serving."
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: unknown format {meta.get('format')!r}; expected {_FORMAT!r}.")
    return meta


__all__ = [
    "is_quantized_linen",
    "layer_plans",
    "quantize_model",
    "read_rules",
    "report",
    "restore_serving",
    "save_serving",
    "to_serving",
]
