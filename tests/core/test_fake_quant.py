"""fake_quant and LSQ: the forward pass is the round trip, the backward pass is straight-through."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

EPS32 = float(np.finfo(np.float32).eps)

SPECS = [
    jq.QuantSpec(qtype="int4", channel_axes=(1,), group_size=4),
    jq.QuantSpec(qtype="int3", symmetric=False, calibration="minmax"),
    jq.QuantSpec(qtype="int2", channel_axes=(1,), calibration="mse"),
    jq.QuantSpec(qtype="int8", channel_axes=(1,), calibration="percentile", percentile=90.0),
    jq.QuantSpec(qtype="fp8_e5m2", channel_axes=(-1,)),
    jq.QuantSpec(qtype="nf4", channel_axes=(1,), group_size=4),
]
SPEC_IDS = [f"{s.qtype}-{s.calibration}-g{s.group_size}" for s in SPECS]


def _x(seed=0, shape=(8, 6)):
    return np.random.default_rng(seed).standard_t(3.0, size=shape).astype(np.float32)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_forward_is_the_round_trip(spec):
    x = _x()
    expected = np.asarray(jq.dequantize(jq.quantize(x, spec)))
    np.testing.assert_array_equal(np.asarray(jq.fake_quant(x, spec)), expected)
    np.testing.assert_array_equal(
        np.asarray(jq.fake_quant(x, spec, gradient="clipped_ste")), expected
    )


def test_forward_keeps_dtype_and_handles_stochastic_keys():
    x = jnp.asarray(_x(), jnp.bfloat16)
    spec = jq.QuantSpec(qtype="int4", channel_axes=(1,))
    y = jq.fake_quant(x, spec)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jq.dequantize(jq.quantize(x, spec))))
    sto = jq.QuantSpec(qtype="int4", channel_axes=(1,), rounding="stochastic")
    key = jax.random.key(3)
    np.testing.assert_array_equal(
        np.asarray(jq.fake_quant(_x(), sto, key=key)),
        np.asarray(jq.dequantize(jq.quantize(_x(), sto, key=key))),
    )


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_ste_gradient_is_all_ones(spec):
    g = jax.grad(lambda v: jnp.sum(jq.fake_quant(v, spec)))(_x())
    np.testing.assert_array_equal(np.asarray(g), np.ones((8, 6)))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_ste_matches_the_identity_downstream(spec):
    """d f(fake_quant(x)) / dx == f'(y) at y = fake_quant(x): quantization is the identity backward.

    (``check_grads`` against finite differences is meaningless here: round() is piecewise
    constant, so the numerical derivative is 0 and the straight-through one is 1 by design.)
    """
    x = _x()
    w = np.linspace(-2.0, 2.0, x.size, dtype=np.float32).reshape(x.shape)

    def f(y):
        return jnp.sum(jnp.sin(y) * w + 0.5 * y**2)

    got = jax.grad(lambda v: f(jq.fake_quant(v, spec)))(x)
    y = jq.fake_quant(x, spec)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.grad(f)(y)))
    # Forward mode agrees: the tangent passes through unchanged.
    t = np.cos(np.arange(x.size, dtype=np.float32)).reshape(x.shape)
    _, tangent = jax.jvp(lambda v: jq.fake_quant(v, spec), (x,), (t,))
    np.testing.assert_array_equal(np.asarray(tangent), t)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipped_ste_zero_outside_percentile_range(symmetric):
    x = _x(seed=1, shape=(256, 6))
    p = 90.0  # the rank 0.9 * 255 = 229.5 falls between samples: no element sits on the edge
    spec = jq.QuantSpec(
        qtype="int4", channel_axes=(1,), calibration="percentile", percentile=p, symmetric=symmetric
    )
    if symmetric:
        hi = np.percentile(np.abs(x), p, axis=0)
        inside = np.abs(x) <= hi
    else:
        lo, hi = np.percentile(x, 100 - p, axis=0), np.percentile(x, p, axis=0)
        inside = (x >= lo) & (x <= hi)
    assert 0 < (~inside).sum() < x.size  # the clip range really clips the heavy tail
    g = jax.grad(lambda v: jnp.sum(jq.fake_quant(v, spec, gradient="clipped_ste")))(x)
    np.testing.assert_array_equal(np.asarray(g), inside.astype(np.float32))
    # Plain STE ignores the clipping.
    g_ste = jax.grad(lambda v: jnp.sum(jq.fake_quant(v, spec)))(x)
    np.testing.assert_array_equal(np.asarray(g_ste), np.ones_like(x))


def test_clipped_ste_is_all_ones_when_nothing_is_clipped():
    spec = jq.QuantSpec(qtype="int4", channel_axes=(1,))  # absmax: the range covers every x
    g = jax.grad(lambda v: jnp.sum(jq.fake_quant(v, spec, gradient="clipped_ste")))(_x())
    np.testing.assert_array_equal(np.asarray(g), np.ones((8, 6)))


def test_unknown_gradient_raises():
    with pytest.raises(ValueError, match="gradient"):
        jq.fake_quant(_x(), jq.QuantSpec(qtype="int8"), gradient="pwl")


# --- LSQ ---------------------------------------------------------------------------------------
def test_lsq_gradients_by_hand():
    """int3 (qmax = 3), one scale s = 1 over n = 5 elements, L = sum(y).

    x / s = [0.3, -1.2, 2.7, 5.0, -6.0]; the last two are clipped to +-3.
    dL/dx = [1, 1, 1, 0, 0] (straight through inside the range, 0 outside).
    dL/ds = g * sum_i (inside: round(x_i / s) - x_i / s; outside: +-qmax)
          = g * ((0 - 0.3) + (-1 + 1.2) + (3 - 2.7) + 3 - 3) = g * 0.2,
    with LSQ's gradient scale g = 1 / sqrt(n * qmax) = 1 / sqrt(15).
    """
    spec = jq.QuantSpec(qtype="int3")
    x = jnp.array([0.3, -1.2, 2.7, 5.0, -6.0], jnp.float32)
    s = jnp.array([1.0], jnp.float32)
    y = jq.lsq_fake_quant(x, s, spec)
    np.testing.assert_array_equal(np.asarray(y), [0.0, -1.0, 3.0, 3.0, -3.0])
    gx, gs = jax.grad(lambda x, s: jnp.sum(jq.lsq_fake_quant(x, s, spec)), argnums=(0, 1))(x, s)
    np.testing.assert_array_equal(np.asarray(gx), [1.0, 1.0, 1.0, 0.0, 0.0])
    expected = 0.2 / np.sqrt(15.0)
    assert gs.shape == (1,)
    assert abs(float(gs[0]) - expected) <= 16 * EPS32 * 6.0 / np.sqrt(15.0)  # ulps of the terms
    assert float(gs[0]) != 0.0


def test_lsq_gradients_match_the_formula_per_channel():
    spec = jq.QuantSpec(qtype="int4", channel_axes=(1,))
    qmax = spec.qt.qmax
    x = _x(seed=2)
    s = np.asarray(jq.lsq_init_scale(x, spec))
    # lsq_init_scale is LSQ's 2 mean|x| / sqrt(qmax), per channel.
    np.testing.assert_allclose(s[0], 2 * np.abs(x).mean(axis=0) / np.sqrt(qmax), rtol=4 * EPS32)
    gx, gs = jax.grad(lambda x, s: jnp.sum(jq.lsq_fake_quant(x, s, spec)), argnums=(0, 1))(x, s)
    v = x / s
    inside = np.abs(v) < qmax
    # Inside: (1 / s) * s, which is 1 up to one rounding.
    np.testing.assert_allclose(np.asarray(gx), inside.astype(np.float32), rtol=0, atol=2 * EPS32)
    per_elem = np.where(inside, np.round(v) - v, np.sign(v) * qmax)
    n = x.shape[0]
    expected = per_elem.sum(axis=0) / np.sqrt(n * qmax)
    tol = 16 * EPS32 * n * qmax / np.sqrt(n * qmax)  # ulps of each term, summed over n
    np.testing.assert_allclose(np.asarray(gs)[0], expected, atol=tol, rtol=0)
    assert np.all(np.asarray(gs) != 0)
    # The forward pass is symmetric quantization with step s.
    y = np.asarray(jq.lsq_fake_quant(x, s, spec))
    np.testing.assert_allclose(
        y, np.clip(np.round(v), -qmax, qmax) * s, rtol=0, atol=4 * EPS32 * qmax * s.max()
    )


def test_lsq_validation():
    x = _x()
    with pytest.raises(ValueError, match="symmetric int"):
        jq.lsq_fake_quant(x, jnp.ones((1, 1)), jq.QuantSpec(qtype="nf4"))
    with pytest.raises(ValueError, match="symmetric int"):
        jq.lsq_fake_quant(x, jnp.ones((1, 1)), jq.QuantSpec(qtype="int4", symmetric=False))
    with pytest.raises(ValueError, match="shape"):
        jq.lsq_fake_quant(x, jnp.ones((6,)), jq.QuantSpec(qtype="int4", channel_axes=(1,)))
