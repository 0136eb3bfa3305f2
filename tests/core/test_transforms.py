"""quantize / dequantize / fake_quant under jit, vmap, grad and with sharded inputs."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant as jq

SPECS = [
    jq.QuantSpec(qtype="int4", channel_axes=(1,), group_size=4),
    jq.QuantSpec(qtype="int2", channel_axes=(1,), symmetric=False),
    jq.QuantSpec(qtype="int3", channel_axes=(1,), calibration="mse"),
    jq.QuantSpec(qtype="int8", channel_axes=(1,), calibration="percentile", percentile=90.0),
    jq.QuantSpec(qtype="fp8_e4m3", channel_axes=(1,)),
    jq.QuantSpec(qtype="nf4", channel_axes=(1,), group_size=2),
]
SPEC_IDS = [
    f"{s.qtype}-{s.calibration}-g{s.group_size}-{'sym' if s.symmetric else 'asym'}" for s in SPECS
]


def _x(seed=0, shape=(8, 6)):
    return np.random.default_rng(seed).standard_t(3.0, size=shape).astype(np.float32)


def _assert_qarrays_equal(a, b):
    """Same tree structure (qtype, shape and layout are static metadata) and equal leaves."""
    chex.assert_trees_all_equal_structs(a, b)
    chex.assert_trees_all_equal(a, b, strict=True)


def _bitwise(spec):
    """absmax/minmax reproduce bit for bit across jit, vmap and sharding. percentile and mse
    compute the range with interpolation / a ratio grid that XLA may fuse differently, so their
    scales can move by ulps and an element on a rounding tie may take the neighbouring code:
    those are compared within a step instead."""
    return spec.calibration in ("absmax", "minmax")


def _assert_close_within_step(got, want):
    """Same scales up to ulps; round trips within one step (a tie may round either way)."""
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(np.asarray(got.scale), np.asarray(want.scale), rtol=8 * eps)
    step = np.asarray(want.scale)
    if want.group_size is not None:
        step = np.repeat(step, want.group_size, axis=want.group_axis)
    diff = np.abs(np.asarray(got.dequantize()) - np.asarray(want.dequantize()))
    assert np.all(diff <= step * (1 + 8 * eps * 2**8))


# --- jit -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_jit_matches_eager(spec):
    x = _x()
    eager_q = jq.quantize(x, spec)
    jit_q = jax.jit(jq.quantize, static_argnums=1)(x, spec)
    if not _bitwise(spec):
        _assert_close_within_step(jit_q, eager_q)
        return
    _assert_qarrays_equal(jit_q, eager_q)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(jq.dequantize)(eager_q)), np.asarray(jq.dequantize(eager_q))
    )
    np.testing.assert_array_equal(
        np.asarray(jax.jit(jq.fake_quant, static_argnums=1)(x, spec)),
        np.asarray(jq.fake_quant(x, spec)),
    )


def test_jit_with_stochastic_rounding_matches_eager():
    spec = jq.QuantSpec(qtype="int4", channel_axes=(1,), rounding="stochastic")
    key = jax.random.key(7)
    x = _x()
    a = jax.jit(lambda v, k: jq.quantize(v, spec, key=k))(x, key)
    _assert_qarrays_equal(a, jq.quantize(x, spec, key=key))


# --- vmap ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_vmap_matches_per_example_loop(spec):
    xs = _x(seed=1, shape=(3, 8, 6))
    batched = jax.vmap(lambda v: jq.quantize(v, spec))(xs)
    loop = [jq.quantize(xs[i], spec) for i in range(xs.shape[0])]
    if not _bitwise(spec):
        for i, q in enumerate(loop):
            _assert_close_within_step(jax.tree_util.tree_map(lambda a, i=i: a[i], batched), q)
        return
    for field in ("qvalue", "scale", "zero_point"):
        got = getattr(batched, field)
        if got is None:
            assert all(getattr(q, field) is None for q in loop)
            continue
        want = np.stack([np.asarray(getattr(q, field)) for q in loop])
        np.testing.assert_array_equal(np.asarray(got), want)
    deq = jax.vmap(jq.dequantize)(batched)
    fq = jax.vmap(lambda v: jq.fake_quant(v, spec))(xs)
    want = np.stack([np.asarray(q.dequantize()) for q in loop])
    np.testing.assert_array_equal(np.asarray(deq), want)
    np.testing.assert_array_equal(np.asarray(fq), want)


def test_vmap_over_keys_and_in_axes():
    spec = jq.QuantSpec(qtype="int4", channel_axes=(1,), rounding="stochastic")
    x = _x()
    keys = jax.random.split(jax.random.key(0), 4)
    out = jax.vmap(lambda k: jq.fake_quant(x, spec, key=k))(keys)
    for i in range(4):
        np.testing.assert_array_equal(
            np.asarray(out[i]), np.asarray(jq.fake_quant(x, spec, key=keys[i]))
        )
    # Batch axis in the middle: each slice [:, b, :] is its own tensor.
    xs = _x(seed=2, shape=(8, 3, 6))
    nearest = dataclasses.replace(spec, rounding="nearest")
    got = jax.vmap(lambda v: jq.fake_quant(v, nearest), in_axes=1, out_axes=1)(xs)
    for b in range(3):
        np.testing.assert_array_equal(
            np.asarray(got[:, b]), np.asarray(jq.fake_quant(xs[:, b], nearest))
        )


# --- grad ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS[:3], ids=SPEC_IDS[:3])
def test_grad_under_jit_and_vmap(spec):
    xs = _x(seed=3, shape=(2, 8, 6))
    w = np.linspace(-1.0, 1.0, 8 * 6, dtype=np.float32).reshape(8, 6)

    def loss(v):
        return jnp.sum(jq.fake_quant(v, spec) * w)

    g = jax.jit(jax.vmap(jax.grad(loss)))(xs)
    np.testing.assert_array_equal(np.asarray(g), np.broadcast_to(w, xs.shape))  # STE: d/dx = w


def test_dequantize_is_differentiable_in_scale_and_zero_point():
    """Dequantization is linear in scale and zero point: check_grads applies there."""
    x = _x()
    q = jq.quantize(x, jq.QuantSpec(qtype="int4", channel_axes=(1,), group_size=4, symmetric=False))

    def f(scale, zero_point):
        return jq.dequantize(dataclasses.replace(q, scale=scale, zero_point=zero_point))

    jax.test_util.check_grads(f, (q.scale, q.zero_point), order=2, modes=("fwd", "rev"))
    g = jax.grad(lambda s: jnp.sum(f(s, q.zero_point)))(q.scale)
    codes = np.asarray(q.codes(), np.float32).reshape(2, 4, 6)
    # d sum((c - z) * s) / ds = sum over the group of (c - z).
    want = (codes - np.asarray(q.zero_point)[:, None, :]).sum(axis=1)
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6, atol=1e-5)


# --- sharding --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()), ("x",))


SHARDED = [0, 1, 2, 5]  # int4 g4, int2 asym, int3 mse, nf4 g2: each code path once


@pytest.mark.parametrize("spec", [SPECS[i] for i in SHARDED], ids=[SPEC_IDS[i] for i in SHARDED])
def test_sharded_inputs_match_unsharded(spec, mesh):
    x = _x(shape=(8, 16))  # 16 channels over 8 devices
    want = jq.quantize(x, spec)
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "x")))  # channel axis over 8 devices
    got = jax.jit(jq.quantize, static_argnums=1)(xs, spec)
    if _bitwise(spec):
        _assert_qarrays_equal(got, want)
    else:
        _assert_close_within_step(got, want)
    channel_sharded = NamedSharding(mesh, P(None, "x"))
    for leaf in (got.qvalue, got.scale):
        assert not leaf.sharding.is_fully_replicated
        assert leaf.sharding.is_equivalent_to(channel_sharded, leaf.ndim)
    # Dequantize and fake_quant keep the channel sharding too.
    deq = jax.jit(jq.dequantize)(got)
    fq = jax.jit(jq.fake_quant, static_argnums=1)(xs, spec)
    for out in (deq, fq):
        assert out.sharding.is_equivalent_to(channel_sharded, out.ndim)
    if _bitwise(spec):
        np.testing.assert_array_equal(np.asarray(deq), np.asarray(want.dequantize()))
        np.testing.assert_array_equal(np.asarray(fq), np.asarray(want.dequantize()))
        if spec is SPECS[0]:  # eager (not jitted) quantize of a sharded array agrees too
            _assert_qarrays_equal(jq.quantize(xs, spec), want)


def test_sharded_grad(mesh):
    spec = jq.QuantSpec(qtype="int4", channel_axes=(1,), group_size=4)
    x = _x(shape=(8, 16))
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "x")))
    g = jax.jit(jax.grad(lambda v: jnp.sum(jq.fake_quant(v, spec) ** 2)))(xs)
    want = 2 * np.asarray(jq.fake_quant(x, spec))  # STE: 2 * y
    np.testing.assert_array_equal(np.asarray(g), want)
    assert not g.sharding.is_fully_replicated
