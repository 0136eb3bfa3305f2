"""Core inputs that used to fail inside jax or silently give NaN (issue 13)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.errors import JaxquantError


@pytest.mark.parametrize("shape", [(0,), (0, 4), (4, 0)])
def test_quantize_empty_array_is_a_clear_error(shape):
    with pytest.raises(JaxquantError, match=r"empty array.*Skip empty tensors"):
        jq.quantize(jnp.zeros(shape), jq.QuantSpec(qtype="int8"))


@pytest.mark.parametrize("config", [jq.w8a8(), jq.weight_only("int4")])
def test_dot_general_axis_out_of_range_names_it(config):
    x, w = jnp.ones((2, 32)), jnp.ones((32, 4))
    with pytest.raises(ValueError, match=r"lhs axis 5 is out of range for a lhs of rank 2"):
        jq.dot_general(x, w, (((5,), (0,)), ((), ())), config=config)
    with pytest.raises(ValueError, match=r"rhs axis 2 is out of range"):
        jq.dot_general(x, w, (((1,), (2,)), ((), ())), config=config)


def test_dot_general_contracting_sizes_must_match():
    with pytest.raises(
        ValueError, match=r"sizes \[3\] but rhs contracting axes \(1,\) have sizes \[4\]"
    ):
        jq.dot_general(
            jnp.ones((2, 3)), jnp.ones((3, 4)), (((1,), (1,)), ((), ())), config=jq.w8a8()
        )


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_scale_below_the_scale_dtype_is_clamped_not_zero(symmetric, scale_dtype):
    """|x| ~ 1e-9: range / 127 underflows float16 to 0, which gave NaN (asym) or inf codes."""
    x = jnp.asarray([1e-9, -3e-9, 2e-9, 0.0], jnp.float32)
    spec = jq.QuantSpec(qtype="int8", scale_dtype=scale_dtype, symmetric=symmetric)
    q = jq.quantize(x, spec)
    tiny = float(jnp.finfo(scale_dtype).tiny)
    assert float(jnp.abs(q.scale).min()) >= tiny
    x_hat = np.asarray(q.dequantize())
    assert np.isfinite(x_hat).all()
    step = max(float(jnp.abs(q.scale).max()), float(jnp.abs(x).max()) / 127)
    np.testing.assert_allclose(x_hat, np.asarray(x), atol=step / 2 + 1e-12)
    assert np.isfinite(
        np.asarray(jax.jit(jq.quantize, static_argnums=1)(x, spec).dequantize())
    ).all()


def test_normal_scales_are_unchanged_by_the_clamp():
    x = jax.random.normal(jax.random.key(0), (64, 32))
    spec = jq.QuantSpec(qtype="int8", channel_axes=(1,), scale_dtype="float16")
    q = jq.quantize(x, spec)
    expect = (jnp.abs(x).max(axis=0, keepdims=True) / 127).astype(jnp.float16)
    np.testing.assert_array_equal(np.asarray(q.scale).ravel(), np.asarray(expect).ravel())
