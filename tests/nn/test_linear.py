"""QDense / QDenseGeneral / QEinsum in the four modes; activation statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.core import QArray
from jaxquant.core.dot_config import w8a8, weight_only
from jaxquant.nn import (
    QDense,
    QDenseGeneral,
    QEinsum,
    QuantMode,
    act_stats_init,
    act_stats_update,
    calibrate_model,
    convert,
)

EPS32 = float(np.finfo(np.float32).eps)
X = jax.random.normal(jax.random.key(1), (2, 5, 16))
CONFIGS = {"w8a8": w8a8(), "w8": weight_only("int8"), "w4g4": weight_only("int4", 4), "float": None}


def layers(cfg):
    return {
        "dense": QDense(12, config=cfg),
        "dense_general": QDenseGeneral((3, 4), config=cfg),
        "einsum": QEinsum(shape=(16, 3, 4), einsum_str="bsd,dhk->bshk", config=cfg),
    }


CASES = [("dense", c) for c in CONFIGS] + [("dense_general", "w4g4"), ("einsum", "w8a8")]


@pytest.mark.parametrize("kind,cfg_name", CASES)
def test_train_convert_serve(kind, cfg_name):
    cfg = CONFIGS[cfg_name]
    layer = layers(cfg)[kind]
    params = layer.init(jax.random.key(0), X)["params"]
    y_train = jax.jit(layer.apply)({"params": params}, X)
    serve_params = convert(layer, params, X)
    kernel = serve_params["kernel"]
    assert isinstance(kernel, QArray) == (cfg is not None)
    serve = layer.clone(mode=QuantMode.SERVE)
    # SERVE's init builds the same tree structure, so eval_shape gives the serving layout.
    assert jax.tree.structure(serve.init(jax.random.key(0), X)["params"]) == jax.tree.structure(
        serve_params
    )
    y_serve = jax.jit(serve.apply)({"params": serve_params}, X)
    # Same codes and scales; only the float rescale may be reassociated: a few ulps of |y|.
    tol = 4 * EPS32 * float(jnp.max(jnp.abs(y_train)))
    np.testing.assert_allclose(y_serve, y_train, rtol=0, atol=tol)


def test_serve_dense_matches_dequantized_reference():
    layer = QDense(12, config=weight_only("int4", 4))
    params = layer.init(jax.random.key(0), X)["params"]
    sp = convert(layer, params, X)
    ref = X @ sp["kernel"].dequantize()
    y = layer.clone(mode=QuantMode.SERVE).apply({"params": sp}, X)
    np.testing.assert_allclose(y, ref, rtol=0, atol=16 * EPS32 * float(jnp.max(jnp.abs(ref))))
    assert sp["kernel"].qvalue.dtype == jnp.uint8 and sp["kernel"].qvalue.shape == (8, 12)


def test_act_stats_running():
    s = act_stats_init((4,))
    a = jnp.arange(24.0).reshape(2, 3, 4) - 10.0
    b = 3.0 * jnp.ones((5, 4))
    s = act_stats_update(s, a)
    s = jax.jit(act_stats_update)(s, b)
    assert int(s.count) == 2
    assert float(s.min) == -10.0 and float(s.max) == 13.0
    np.testing.assert_array_equal(s.channel_absmax, np.max(np.abs(np.asarray(a)).reshape(-1, 4), 0))
    p_a = np.percentile(np.asarray(a), 99.99)
    np.testing.assert_allclose(s.pct_hi, (p_a + 3.0) / 2, rtol=1e-6)


def test_calibrate_and_static_activation():
    layer = QDense(12, config=w8a8(), static_activation="absmax")
    params = layer.init(jax.random.key(0), X)["params"]
    with pytest.raises(ValueError, match="calibrate"):
        convert(layer, params, X)
    stats = calibrate_model(layer, params, [X, 0.5 * X])
    assert float(stats["lhs"].max) == pytest.approx(float(jnp.max(X)))
    sp = convert(layer, params, X, quant_stats=stats)
    s = float(sp["lhs_scale"])
    assert s == pytest.approx(float(jnp.max(jnp.abs(X))) / 127, rel=1e-6)
    y = layer.clone(mode=QuantMode.SERVE).apply({"params": sp}, X)
    # Reference: x on the static grid times the dequantized kernel.
    x_hat = jnp.clip(jnp.round(X / s), -127, 127) * s
    ref = x_hat @ sp["kernel"].dequantize()
    np.testing.assert_allclose(y, ref, rtol=0, atol=16 * EPS32 * float(jnp.max(jnp.abs(ref))))


def test_static_activation_needs_activation_quantization():
    with pytest.raises(ValueError, match="lhs"):
        QDense(4, config=weight_only("int8"), static_activation="absmax").init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="static_activation"):
        QDense(4, config=w8a8(), static_activation="max").init(jax.random.key(0), X)


def test_serve_w8a8_is_integer_dot():
    layer = QDense(12, config=w8a8())
    params = layer.init(jax.random.key(0), X)["params"]
    sp = convert(layer, params, X)
    jaxpr = jax.make_jaxpr(layer.clone(mode=QuantMode.SERVE).apply)({"params": sp}, X)
    dots = [e for e in iter_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.int8 for e in dots for v in e.invars)


def iter_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from iter_eqns(inner)
