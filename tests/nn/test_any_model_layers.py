"""``jq.quantize_model`` on the less common layer forms: an ``Einsum`` with ``...``, a
``DenseGeneral`` with ``batch_dims``, grouped convolutions; group sizes adapted per layer and
reported; what cannot be quantized raises an error naming the module path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.core import QArray
from jaxquant.nn.any_model import layer_plans, report, to_serving

G16 = [jq.QuantRule(".*", jq.weight_only("int4", group_size=16))]


def _linen_round_trip(model, x, rules=G16):
    """Quantizes, checks train -> convert -> serve, returns (plans, serving params)."""
    qmodel = jq.quantize_model(model, rules, x)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    y_float = jax.jit(model.apply)(variables, x)
    y_train = jax.jit(qmodel.apply)(variables, x)
    serving = to_serving(qmodel, variables)
    np.testing.assert_allclose(jax.jit(qmodel.apply)(serving, x), y_train, rtol=0, atol=1e-5)
    assert 0 < float(jnp.max(jnp.abs(y_train - y_float)))  # quantized
    return layer_plans(qmodel), serving["params"], qmodel


class Layers(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: [b, 6, 6, 12]
        h = nn.Conv(32, (3, 3), feature_group_count=2, name="conv")(x)  # in per group: 6
        h = nn.Einsum((32, 48), "...d,df->...f", name="ell")(h)  # contracts 32
        t = nn.DenseGeneral(20, batch_dims=(0,), name="batched")(h.reshape(2, -1, 48))
        return t.sum() + nn.Embed(10, 24, name="emb")(jnp.arange(4)).sum()


@pytest.mark.slow  # 20-45 s on 2 cores; CI runs it in its slow pass
def test_linen_layer_forms_and_adapted_groups():
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 12))
    plans, params, qmodel = _linen_round_trip(Layers(), x)
    sizes = {p: (pl.group_size, pl.requested_group_size) for p, pl in plans.items()}
    # each group is the largest divisor of the layer's contracting size not above 16
    assert sizes == {"conv": (6, 16), "ell": (16, 16), "batched": (16, 16), "emb": (12, 16)}
    assert "conv: Conv (conv_general_dilated) w=int4 a=float, group 6 (asked 16)" in report(qmodel)
    assert plans["ell"].contracting_axes == (0,)  # '...' spelled out; the kernel's d
    # scales: conv per (input group, output channel); batched DenseGeneral per batch entry too
    assert params["conv"]["kernel"].scale.shape == (1, 1, 1, 32)
    assert params["batched"]["kernel"].scale.shape == (2, 3, 20)
    assert params["emb"]["embedding"].scale.shape == (10, 2)
    assert all(
        isinstance(p["kernel" if "kernel" in p else "embedding"], QArray) for p in params.values()
    )


def test_nnx_einsum_with_ellipsis():
    model = nnx.Einsum("...d,df->...f", (32, 8), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 32))
    qmodel = jq.quantize_model(model, G16, x)
    assert layer_plans(qmodel)[""].contracting_axes == (0,)
    call = nnx.jit(lambda m, v: m(v))
    np.testing.assert_allclose(call(to_serving(qmodel), x), call(qmodel, x), rtol=0, atol=1e-5)


class Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.ConvLocal(4, (3, 3))(x)


class Nested(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Inner(name="block")(nn.Conv(4, (3, 3))(x))


def test_errors_name_the_module_path():
    x = jnp.ones((1, 6, 6, 4))
    w8 = [jq.QuantRule(".*", jq.w8a8())]
    with pytest.raises(ValueError, match=r"^block/ConvLocal_0: rule '\.\*' matches this ConvLocal"):
        jq.quantize_model(Nested(), w8, x)
    with pytest.raises(ValueError, match=r"^Dense_0: this Dense sets its own dot_general"):

        class Own(nn.Module):
            @nn.compact
            def __call__(self, v):
                return nn.Dense(4, dot_general=lambda *a, **k: jax.lax.dot_general(*a))(v)

        jq.quantize_model(Own(), w8, jnp.ones((2, 8)))

    class NnxOwn(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(
                8, 4, dot_general=lambda *a, **k: jax.lax.dot_general(*a), rngs=rngs
            )

        def __call__(self, v):
            return self.proj(v)

    with pytest.raises(ValueError, match=r"^proj: this Linear sets its own dot_general"):
        jq.quantize_model(NnxOwn(nnx.Rngs(0)), w8, jnp.ones((2, 8)))
    # groups over two contracting axes tile the innermost one (tests/nn/test_any_model_groups.py)
    class TwoAxes(nn.Module):
        @nn.compact
        def __call__(self, v):
            return nn.DenseGeneral(4, axis=(-2, -1), name="out")(v)

    plan = layer_plans(jq.quantize_model(TwoAxes(), G16, jnp.ones((2, 3, 16))))["out"]
    assert plan.group_size == 16 and plan.weight_spec().group_axis == 1
