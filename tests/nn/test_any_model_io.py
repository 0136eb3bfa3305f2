"""Saving a model from ``jq.quantize_model``: serving params + rules, restored onto the model's
code alone (linen and NNX); rules round-trip through JSON exactly."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.core import QArray
from jaxquant.nn.any_model import (
    SIDECAR,
    layer_plans,
    read_rules,
    restore_serving,
    save_serving,
    to_serving,
)
from jaxquant.nn.nnx_model import QKernel

RULES = (
    jq.QuantRule(r"^Dense_0$|^lin$", jq.w8a8()),
    jq.QuantRule(r"skip", None),
    jq.QuantRule(r".*", jq.weight_only("int4", group_size=16)),
)
TOKENS = jnp.arange(10).reshape(2, 5) % 40


class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(40, 32)
        return embed.attend(nn.relu(nn.Dense(32)(embed(tokens))))


class NnxTiedLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(40, 32, rngs=rngs)
        self.lin = nnx.Linear(32, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)

    def __call__(self, tokens):
        return self.embed.attend(self.norm(nnx.relu(self.lin(self.embed(tokens)))))


def _qarrays(tree):
    return [
        x
        for x in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, QArray))
        if isinstance(x, QArray)
    ]


def test_rules_round_trip_through_json():
    for rule in RULES:
        assert jq.QuantRule.from_json(rule.to_json()) == rule
        assert jq.QuantRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule


def test_linen_save_restore_serves_the_same(tmp_path):
    model = TiedLM()
    with pytest.warns(UserWarning, match="skip"):
        qmodel = jq.quantize_model(model, RULES, TOKENS)
    variables = jax.jit(model.init)(jax.random.key(0), TOKENS)
    serving = to_serving(qmodel, variables)
    save_serving(tmp_path / "m", qmodel, variables)  # float variables: converted on save
    assert read_rules(tmp_path / "m") == RULES
    meta = json.loads((tmp_path / "m" / SIDECAR).read_text())
    assert meta["api"] == "linen" and meta["layers"]["Dense_0"]["config"]["lhs"] is not None
    qmodel2, restored = restore_serving(tmp_path / "m", TiedLM(), TOKENS)
    assert isinstance(qmodel2, TiedLM) and set(layer_plans(qmodel2)) == {"Dense_0", "Embed_0"}
    # the packed codes and scales come back bit for bit, and serve what training computed
    for a, b in zip(_qarrays(serving), _qarrays(restored), strict=True):
        np.testing.assert_array_equal(a.qvalue, b.qvalue)
        np.testing.assert_array_equal(a.scale, b.scale)
    assert len(_qarrays(restored)) == 2
    y_train = jax.jit(qmodel.apply)(variables, TOKENS)
    np.testing.assert_allclose(jax.jit(qmodel2.apply)(restored, TOKENS), y_train, atol=1e-5)
    with pytest.raises(FileExistsError):
        save_serving(tmp_path / "m", qmodel, variables)

    class Other(nn.Module):  # another model: its layers differ from the saved ones
        @nn.compact
        def __call__(self, tokens):
            return nn.Embed(40, 16)(tokens)

    with pytest.raises(ValueError, match=r"saved layers differ .*Embed_0"):
        restore_serving(tmp_path / "m", Other(), TOKENS)
    with pytest.raises(ValueError, match="no quantize_model.json"):
        restore_serving(tmp_path, TiedLM(), TOKENS)


def test_nnx_save_restore_serves_the_same(tmp_path):
    model = NnxTiedLM(nnx.Rngs(0))
    model.norm.scale.set_value(jax.random.normal(jax.random.key(2), (32,)))  # not the init's
    with pytest.warns(UserWarning, match="skip"):
        qmodel = jq.quantize_model(model, RULES, TOKENS)
    call = nnx.jit(lambda m, t: m(t))
    y_train = call(qmodel, TOKENS)
    save_serving(tmp_path / "m", qmodel)
    assert read_rules(tmp_path / "m") == RULES
    # restored onto a freshly initialised model: every weight comes from the checkpoint
    restored = restore_serving(tmp_path / "m", NnxTiedLM(nnx.Rngs(7)), TOKENS)
    assert isinstance(restored.embed.embedding, QKernel) and isinstance(
        restored.lin.kernel, QKernel
    )
    np.testing.assert_allclose(call(restored, TOKENS), y_train, atol=1e-5)
    np.testing.assert_array_equal(restored.norm.scale[...], qmodel.norm.scale[...])
