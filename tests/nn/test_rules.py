"""Rules by module path on a plain linen model (nn.Dense / DenseGeneral / Einsum)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.core import QArray
from jaxquant.core.dot_config import DotGeneralConfig, w8a8, weight_only
from jaxquant.core.dot_general import make_dot_general
from jaxquant.nn import (
    QuantRule,
    infer_contracting_axes,
    match_rule,
    param_bytes,
    quantize_params,
    quantized_interceptor,
)

EPS32 = float(np.finfo(np.float32).eps)
X = jax.random.normal(jax.random.key(3), (4, 16))


class Plain(nn.Module):
    """A model that knows nothing about jaxquant except the official dot_general hook."""

    up_config: DotGeneralConfig | None = None

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32, dot_general=make_dot_general(self.up_config), name="up")(x)
        x = nn.relu(x)
        x = nn.DenseGeneral((2, 8), name="heads")(x)  # kernel [32, 2, 8]
        x = nn.Einsum((2, 8, 4), "bhk,hkf->bf", use_bias=False, name="mix")(x)  # contracts h, k
        return nn.Dense(4, use_bias=False, name="out")(x)


def test_plain_dense_with_make_dot_general_serves_quantized_params():
    model = Plain(up_config=w8a8())
    params = model.init(jax.random.key(0), X)["params"]
    y_train = model.apply({"params": params}, X)  # QAT forward of "up" through the hook
    rules = [QuantRule(r"^up$", w8a8())]
    qparams, report = quantize_params(params, rules)
    assert isinstance(qparams["up"]["kernel"], QArray)
    assert report.quantized == ("up",) and report.unmatched_rules == ()
    assert set(report.unmatched_paths) == {"heads", "mix", "out"}
    with nn.intercept_methods(quantized_interceptor(rules)):
        y_serve = jax.jit(model.apply)({"params": qparams}, X)
    np.testing.assert_allclose(
        y_serve, y_train, rtol=0, atol=8 * EPS32 * float(jnp.max(jnp.abs(y_train)))
    )


def test_dense_general_and_einsum_kernels():
    model = Plain()
    params = model.init(jax.random.key(0), X)["params"]
    axes = infer_contracting_axes(model, X)
    assert axes == {"up": (0,), "heads": (0,), "mix": (0, 1), "out": (0,)}
    rules = [QuantRule("heads|mix", weight_only("int8")), QuantRule("out", weight_only("int4", 2))]
    qparams, report = quantize_params(params, rules, contracting_axes=axes)
    mix = qparams["mix"]["kernel"]
    assert mix.scale.shape == (1, 1, 4)  # one scale per output feature, shared over (h, k)
    assert qparams["out"]["kernel"].qvalue.dtype == jnp.uint8
    # Reference: the float model on the dequantized kernels.
    deq = jax.tree.map(
        lambda a: a.dequantize() if isinstance(a, QArray) else a,
        qparams,
        is_leaf=lambda a: isinstance(a, QArray),
    )
    ref = model.apply({"params": deq}, X)
    with nn.intercept_methods(quantized_interceptor(rules)):
        y = model.apply({"params": qparams}, X)
    np.testing.assert_allclose(y, ref, rtol=0, atol=16 * EPS32 * float(jnp.max(jnp.abs(ref))))
    assert param_bytes(qparams) < param_bytes(params)


class PlainLM(nn.Module):
    """nn.Embed with a tied head (``attend``) around a Dense."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(64, 16, name="embed")
        x = nn.Dense(16, use_bias=False, name="mix")(embed(tokens))
        return embed.attend(x)


def test_plain_embed_with_tied_head():
    model, tokens = PlainLM(), jnp.arange(12).reshape(2, 6)
    params = model.init(jax.random.key(0), tokens)["params"]
    assert infer_contracting_axes(model, tokens) == {"embed": (1,), "mix": (0,)}
    rules = [QuantRule("embed", weight_only("int4", 8)), QuantRule("mix", weight_only("int8"))]
    qparams, report = quantize_params(params, rules)
    assert report.quantized == ("embed", "mix")
    table = qparams["embed"]["embedding"]
    assert table.qvalue.shape == (64, 8) and table.scale.shape == (64, 2)  # packed, g8 along D
    deq = jax.tree.map(
        lambda a: a.dequantize() if isinstance(a, QArray) else a,
        qparams,
        is_leaf=lambda a: isinstance(a, QArray),
    )
    ref = model.apply({"params": deq}, tokens)
    with nn.intercept_methods(quantized_interceptor(rules)):
        y = model.apply({"params": qparams}, tokens)
    np.testing.assert_allclose(y, ref, rtol=0, atol=16 * EPS32 * float(jnp.max(jnp.abs(ref))))


def test_first_rule_wins_and_none_keeps_float():
    params = Plain().init(jax.random.key(0), X)["params"]
    rules = [QuantRule("up", None), QuantRule("up|out", w8a8())]
    qparams, report = quantize_params(params, rules, warn=False)
    assert not isinstance(qparams["up"]["kernel"], QArray)
    assert isinstance(qparams["out"]["kernel"], QArray)
    assert report.matched == {"up": 0, "out": 1}
    assert match_rule(rules, "block_0/up")[0] == 0
    assert match_rule(rules, "nothing") is None


def test_unmatched_rules_are_reported():
    params = Plain().init(jax.random.key(0), X)["params"]
    rules = [QuantRule("up", w8a8()), QuantRule("q_projj", w8a8())]
    with pytest.warns(UserWarning, match="q_projj"):
        _, report = quantize_params(params, rules)
    assert report.unmatched_rules == (rules[1],)
    assert "matched nothing" in str(report)


def test_rule_validation():
    with pytest.raises(ValueError, match="regex"):
        QuantRule("(", w8a8())
    with pytest.raises(ValueError, match="DotGeneralConfig"):
        QuantRule("x", "w8a8")
    with pytest.raises(ValueError, match="activations"):
        QuantRule("x", weight_only("int4"), static_activation="absmax")
    with pytest.raises(ValueError, match="static_activation"):
        QuantRule("x", w8a8(), static_activation="max")
