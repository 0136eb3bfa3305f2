"""Layer-level PTQ algorithms: GPTQ beats RTN, folding is exact, AWQ/clip search help."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.core import QArray, QuantSpec, quantize_operand
from jaxquant.ptq import awq, folding, smoothquant
from jaxquant.ptq.gptq import GPTQConfig, gptq_quantize
from jaxquant.ptq.hessian import abs_mean, hessian, stats_init, stats_update


def _correlated(d_in=128, d_out=64, n=1024, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    mix = jax.random.normal(k[0], (d_in, d_in)) / np.sqrt(d_in)
    x = jax.random.normal(k[1], (n, d_in)) @ mix + 0.05 * jax.random.normal(k[2], (n, d_in))
    x = x * jnp.exp(0.7 * jax.random.normal(k[3], (d_in,)))  # uneven channel magnitudes
    w = jax.random.normal(k[2], (d_in, d_out)) / np.sqrt(d_in)
    return x, w


def _out_err(x, w, q):
    return float(jnp.mean((x @ q.dequantize() - x @ w) ** 2))


def test_hessian_accumulates_in_batches():
    x, _ = _correlated()
    st = stats_init(x.shape[1])
    for chunk in jnp.split(x, 4):
        st = stats_update(st, chunk)
    np.testing.assert_allclose(hessian(st), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(abs_mean(st), jnp.mean(jnp.abs(x), 0), rtol=1e-5)
    np.testing.assert_allclose(st.abs_max, jnp.max(jnp.abs(x), 0))


@pytest.mark.parametrize(
    "spec,act_order",
    [
        (QuantSpec(qtype="int4", group_size=32), False),
        (QuantSpec(qtype="int3", group_size=32, symmetric=False), False),
        (QuantSpec(qtype="int4"), False),
        (QuantSpec(qtype="int4", group_size=32), True),
    ],
)
def test_gptq_output_error_below_rtn(spec, act_order):
    x, w = _correlated()
    st = stats_update(stats_init(x.shape[1]), x)
    q, info = gptq_quantize(w, hessian(st), spec, GPTQConfig(act_order=act_order))
    rtn = quantize_operand(w, spec, (0,))
    assert isinstance(q, QArray)
    assert q.qvalue.shape == rtn.qvalue.shape and q.scale.shape == rtn.scale.shape
    assert _out_err(x, w, q) < 0.8 * _out_err(x, w, rtn)


def test_gptq_codes_are_on_the_grid_of_its_scales():
    # Re-quantizing GPTQ's dequantized kernel with its own scales gives back the same codes.
    x, w = _correlated()
    q, _ = gptq_quantize(w, hessian(stats_update(stats_init(128), x)),
                         QuantSpec(qtype="int4", group_size=32))
    full = dataclasses.replace(QuantSpec(qtype="int4", group_size=32), channel_axes=(1,),
                               group_axis=0)
    from jaxquant.core import quantize

    again = quantize(q.dequantize(), full, scale=q.scale)
    np.testing.assert_array_equal(again.qvalue, q.qvalue)


def test_gptq_dead_columns_are_zeroed():
    x, w = _correlated()
    x = x.at[:, :5].set(0.0)
    q, info = gptq_quantize(w, hessian(stats_update(stats_init(128), x)),
                            QuantSpec(qtype="int4", group_size=32))
    assert info["dead"] == 5
    np.testing.assert_array_equal(q.dequantize()[:5], 0.0)


def test_gptq_bad_arguments():
    x, w = _correlated()
    h = hessian(stats_update(stats_init(128), x))
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(w, h, QuantSpec(qtype="int4", group_size=48))
    with pytest.raises(ValueError, match="d_in"):
        gptq_quantize(w, h[:64, :64], QuantSpec(qtype="int4"))
    with pytest.raises(ValueError, match="damp"):
        GPTQConfig(damp=-0.1)


def test_smoothquant_folding_is_exact_in_float():
    x, w = _correlated()
    k2 = w[:, :32] * 3.0
    g = jnp.linspace(0.5, 1.5, x.shape[1])
    s = smoothquant.smooth_scales(jnp.max(jnp.abs(x * g), 0), [w, k2], alpha=0.5)
    g2, (w2, k22) = folding.fold_into_norm(g, [w, k2], s)
    for a, b in (((x * g) @ w, (x * g2) @ w2), ((x * g) @ k2, (x * g2) @ k22)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(a).max()))
    # The smoothed activation's channel ranges are flatter.
    spread = lambda v: float(jnp.max(jnp.abs(v), 0).max() / jnp.max(jnp.abs(v), 0).min())
    assert spread(x * g2) < spread(x * g)


def test_smoothquant_alpha_search_beats_no_smoothing_and_the_fixed_alpha():
    x, w = _correlated()
    x = x.at[:, 3].multiply(40.0)  # an outlier channel, as in LLM activations
    amax = jnp.max(jnp.abs(x), 0)
    s, info = smoothquant.search_alpha(x, [w], amax)
    assert info["alpha"] in smoothquant.ALPHA_GRID
    half = smoothquant.smooth_scales(amax, [w], 0.5)
    err = lambda sc: float(jnp.mean(
        (smoothquant.w8a8_output(x / sc, w * sc[:, None], jq.w8a8()) - x @ w) ** 2))
    np.testing.assert_allclose(err(s), info["loss"], rtol=1e-3)
    assert err(s) <= err(half) * (1 + 1e-6)
    assert info["loss"] < 0.5 * info["loss_unsmoothed"]
    # The fold it feeds is exact in float, so only the quantization error changed.
    np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(x @ w).max()))


def test_fold_into_linear_is_exact_for_swiglu():
    x, w = _correlated()
    k = jax.random.split(jax.random.key(5), 2)
    gate = jax.random.normal(k[0], (128, 96)) / 11
    up = jax.random.normal(k[1], (128, 96)) / 11
    down = jax.random.normal(k[0], (96, 40)) / 10
    s = jnp.exp(jax.random.normal(k[1], (96,)))
    up2, (down2,) = folding.fold_into_linear(up, [down], s)
    f = lambda u, d: (jax.nn.silu(x @ gate) * (x @ u)) @ d
    ref = f(up, down)
    np.testing.assert_allclose(f(up2, down2), ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


def test_awq_scale_search_folds_without_changing_float_output_and_helps():
    x, w = _correlated(seed=3)
    spec = QuantSpec(qtype="int3", group_size=32)
    g = jnp.ones((x.shape[1],))
    s, info = awq.search_scale(x, [w], spec)
    assert info["loss"] <= info["loss_alpha0"]
    g2, (w2,) = folding.fold_into_norm(g, [w], s)
    np.testing.assert_allclose((x * g2) @ w2, x @ w, rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(x @ w).max()))
    q_awq = quantize_operand(w2, spec, (0,))
    err_awq = float(jnp.mean(((x * g2) @ q_awq.dequantize() - x @ w) ** 2))
    assert err_awq <= _out_err(x, w, quantize_operand(w, spec, (0,)))


def test_awq_clip_search_never_worse_than_no_clip():
    x, w = _correlated(seed=4)
    spec = QuantSpec(qtype="int3", group_size=32)
    q = awq.clip_quantize(x, w, spec)
    assert q.scale.shape == quantize_operand(w, spec, (0,)).scale.shape
    assert _out_err(x, w, q) <= _out_err(x, w, quantize_operand(w, spec, (0,))) * (1 + 1e-5)
