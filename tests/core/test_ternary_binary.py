"""Ternary ({-1, 0, 1}, 2 bits) and binary (sign, 1 bit) formats: packing, absmean scales,
exact round trips, edge cases, transforms, checkpoints, storage and the quantized product."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.core import QuantSpec, quantize_operand
from jaxquant.core.fake_quant import lsq_fake_quant
from jaxquant.core.packing import pack, unpack, unpack_plane
from jaxquant.core.qtypes import get_qtype

FORMATS = ("ternary", "binary")
BITS = {"ternary": 2, "binary": 1}


def _w(shape=(128, 24), seed=0):
    return jax.random.normal(jax.random.key(seed), shape) * 0.05


def _spec(qtype, group_size=32, **kw):
    return QuantSpec(qtype=qtype, channel_axes=(1,), group_size=group_size,
                     group_axis=None if group_size is None else 0, **kw)


def _absmean_ref(w: np.ndarray, g: int) -> np.ndarray:
    """numpy reference: mean |w| over each group of ``g`` rows, ``[d_in // g, d_out]``."""
    d_in, d_out = w.shape
    return np.abs(w).reshape(d_in // g, g, d_out).mean(axis=1)


# --- packing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 67])
@pytest.mark.parametrize("axis", [0, 1])
def test_one_bit_pack_unpack_identity(n, axis):
    rng = np.random.default_rng(n)
    shape = (n, 5) if axis == 0 else (5, n)
    codes = np.where(rng.random(shape) < 0.5, -1, 1).astype(np.int8)
    packed = pack(jnp.asarray(codes), 1, axis)
    assert packed.dtype == jnp.uint8 and packed.shape[axis] == -(-n // 8)
    np.testing.assert_array_equal(unpack(packed, 1, axis, n, signed=True), codes)
    bits01 = (codes > 0).astype(np.int8)  # unsigned: the bits themselves
    np.testing.assert_array_equal(unpack(pack(jnp.asarray(bits01), 1, axis), 1, axis, n,
                                         signed=False), bits01)


def test_one_bit_layout_is_little_endian_sign_bits():
    # element 8 i + j -> bit j of byte i, bit set for +1
    codes = np.array([1, -1, -1, 1, -1, -1, -1, -1, 1, 1], np.int8)
    packed = np.asarray(pack(jnp.asarray(codes), 1, 0))
    np.testing.assert_array_equal(packed, [0b00001001, 0b00000011])
    planes = [np.asarray(unpack_plane(jnp.asarray(packed), 1, j, signed=True)) for j in range(8)]
    np.testing.assert_array_equal(np.stack(planes, 1).reshape(-1)[:10], codes)


@pytest.mark.parametrize("n", [4, 13, 64])
def test_ternary_pack_unpack_identity(n):
    codes = np.random.default_rng(n).integers(-1, 2, (3, n)).astype(np.int8)
    packed = pack(jnp.asarray(codes), 2, 1)
    assert packed.shape == (3, -(-n // 4))
    np.testing.assert_array_equal(unpack(packed, 2, 1, n, signed=True), codes)


# --- quantize / dequantize -----------------------------------------------------------------------
@pytest.mark.parametrize("qtype", FORMATS)
def test_absmean_scale_codes_and_exact_dequantize(qtype):
    w = _w()
    q = jq.quantize(w, _spec(qtype))
    assert q.qtype == qtype and q.pack_axis == 0
    assert q.qvalue.shape == (128 * BITS[qtype] // 8, 24)
    scale = np.asarray(q.scale)
    np.testing.assert_allclose(scale, _absmean_ref(np.asarray(w), 32), rtol=1e-6)
    codes = np.asarray(q.codes())
    wn, s_full = np.asarray(w), np.repeat(scale, 32, axis=0)
    if qtype == "ternary":
        assert set(np.unique(codes)) == {-1, 0, 1}
        want = np.clip(np.round(wn / s_full), -1, 1)
    else:
        assert set(np.unique(codes)) == {-1, 1}
        want = np.where(wn >= 0, 1, -1)
    np.testing.assert_array_equal(codes, want)
    # dequantize is exactly codes * scale (no rounding beyond the float product)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), codes * s_full)


@pytest.mark.parametrize("qtype", FORMATS)
def test_values_on_the_grid_come_back_exactly(qtype):
    s = np.array([[0.5, 2.0, 0.25]], np.float32)
    levels = np.array([-1, 0, 1] if qtype == "ternary" else [-1, 1], np.float32)
    codes = np.random.default_rng(0).choice(levels, (8, 3))
    x = jnp.asarray(codes * s)
    q = jq.quantize(x, QuantSpec(qtype=qtype, channel_axes=(1,)), scale=jnp.asarray(s))
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(x))


def test_binary_scale_is_l2_optimal():
    # For sign codes, mean |x| minimises ||x - s sign(x)||^2 over s: any other scale is worse.
    w = _w((64, 4))
    q = jq.quantize(w, _spec("binary", group_size=None))
    err = lambda s: float(jnp.sum((w - s * q.codes()) ** 2))
    best = err(q.scale)
    for f in (0.9, 0.99, 1.01, 1.1):
        assert err(q.scale * f) > best


def test_ternary_error_within_half_a_step_inside_the_grid():
    w = _w((256, 8))
    q = jq.quantize(w, _spec("ternary", group_size=64))
    s = np.repeat(np.asarray(q.scale), 64, axis=0)
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
    inside = np.abs(np.asarray(w)) <= 1.5 * s
    assert inside.mean() > 0.7  # Gaussian: P(|x| <= 1.5 * 0.8 sigma) ~ 0.77
    assert np.all(err[inside] <= 0.5 * s[inside] * (1 + 1e-6))


@pytest.mark.parametrize("qtype", FORMATS)
def test_all_zero_group_gives_zeros_not_nan(qtype):
    w = np.asarray(_w((64, 4))).copy()
    w[:32, 1] = 0.0  # one zero group next to normal ones
    for x in (jnp.asarray(w), jnp.zeros((64, 4))):
        xh = jq.quantize(x, _spec(qtype)).dequantize()
        assert np.all(np.isfinite(xh))
        np.testing.assert_array_equal(np.asarray(xh)[np.asarray(x) == 0], 0.0)
        y = jq.fake_quant(x, _spec(qtype))
        np.testing.assert_array_equal(np.asarray(y)[np.asarray(x) == 0], 0.0)


@pytest.mark.parametrize("qtype", FORMATS)
def test_spec_defaults_and_validation(qtype):
    spec = QuantSpec(qtype=qtype)
    assert spec.calibration == "absmean" and QuantSpec().calibration == "absmax"
    assert QuantSpec.from_json(spec.to_json()) == spec
    assert QuantSpec(qtype=qtype, calibration="absmax").calibration == "absmax"
    assert jq.weight_only(qtype, 64).rhs.calibration == "absmean"
    with pytest.raises(ValueError, match="symmetric=False"):
        QuantSpec(qtype=qtype, symmetric=False)
    with pytest.raises(ValueError, match="full_range"):
        QuantSpec(qtype=qtype, full_range=True)
    with pytest.raises(ValueError, match="absmean"):
        QuantSpec(qtype="int4", calibration="absmean", symmetric=False)


def test_qtype_metadata():
    t, b = get_qtype("ternary"), get_qtype("binary")
    assert (t.qmin, t.qmax, t.storage_bits, t.codes_per_byte, t.has_zero) == (-1, 1, 2, 4, True)
    assert (b.qmin, b.qmax, b.storage_bits, b.codes_per_byte, b.has_zero) == (-1, 1, 1, 8, False)
    assert not t.has_full_range and not b.has_full_range and get_qtype("int4").has_full_range
    with pytest.raises(ValueError, match="Unsupported qtype"):
        QuantSpec(qtype="int1")  # a sign code is not the two's complement 1-bit grid


def test_binary_stochastic_rounding_is_unbiased():
    x = jnp.full((4096, 1), 0.3)
    s = jnp.ones((1, 1))
    spec = QuantSpec(qtype="binary", channel_axes=(1,), rounding="stochastic")
    q = jq.quantize(x, spec, jax.random.key(0), scale=s)
    assert set(np.unique(np.asarray(q.codes()))) == {-1, 1}
    assert abs(float(jnp.mean(q.dequantize())) - 0.3) < 0.05


# --- storage -------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype,ratio", [("ternary", 4), ("binary", 8)])
def test_nbytes_is_true_storage_and_smaller_than_int8(qtype, ratio):
    w = _w((256, 64))
    q = jq.quantize(w, _spec(qtype, group_size=64))
    q8 = jq.quantize(w, _spec("int8", group_size=64))
    scales = 4 * 64 * (256 // 64)
    assert q.nbytes == 256 * 64 // ratio + scales
    assert q8.nbytes == 256 * 64 + scales
    assert q.nbytes / q8.nbytes < 1.05 / ratio + scales / q8.nbytes
    assert q.bits_per_element == pytest.approx(8 / ratio + 32 / 64)


# --- transforms ----------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", FORMATS)
def test_jit_vmap_and_grad(qtype):
    w = _w((2, 64, 8))
    spec = _spec(qtype)
    eager = jq.quantize(w[0], spec)
    jitted = jax.jit(jq.quantize, static_argnums=1)(w[0], spec)
    jax.tree.map(np.testing.assert_array_equal, eager, jitted)
    batched = jax.vmap(lambda x: jq.quantize(x, spec).dequantize())(w)
    np.testing.assert_array_equal(batched[0], eager.dequantize())
    np.testing.assert_array_equal(batched[1], jq.quantize(w[1], spec).dequantize())
    # fake_quant: forward equals dequantize(quantize), gradient straight-through (ones)
    np.testing.assert_array_equal(jq.fake_quant(w[0], spec), eager.dequantize())
    c = jax.random.normal(jax.random.key(3), w[0].shape)
    g = jax.jit(jax.grad(lambda x: jnp.sum(jq.fake_quant(x, spec) * c)))(w[0])
    np.testing.assert_array_equal(g, c)


def test_lsq_binary_forward_is_sign():
    w = _w((64, 4))
    spec = _spec("binary")
    s = jnp.full((2, 4), 0.04)
    y = lsq_fake_quant(w, s, spec)
    np.testing.assert_array_equal(np.asarray(y), np.where(np.asarray(w) >= 0, 0.04, -0.04)
                                  .astype(np.float32))
    gs = jax.grad(lambda s: jnp.sum(lsq_fake_quant(w, s, spec)))(s)
    assert np.all(np.isfinite(gs)) and float(jnp.max(jnp.abs(gs))) > 0


# --- checkpoints ---------------------------------------------------------------------------------
def test_checkpoint_round_trip_bit_identical(tmp_path):
    import jaxquant.checkpoint as ckpt

    tree = {"t": jq.quantize(_w((64, 16)), _spec("ternary")),
            "b": jq.quantize(_w((72, 16), 1), _spec("binary", group_size=24))}
    ckpt.save(tmp_path / "c", tree)
    back = ckpt.restore(tmp_path / "c")
    for k in tree:
        assert back[k].qtype == tree[k].qtype and back[k].shape == tree[k].shape
        assert back[k].pack_axis == tree[k].pack_axis
        jax.tree.map(np.testing.assert_array_equal, back[k], tree[k])


# --- the quantized product -----------------------------------------------------------------------
@pytest.mark.parametrize("qtype", FORMATS)
def test_served_weight_product_equals_fake_quant(qtype):
    x = jax.random.normal(jax.random.key(5), (2, 128))  # few rows: the tiled kernels apply
    w = _w((128, 48))
    dn = (((1,), (0,)), ((), ()))
    cfg = jq.weight_only(qtype, 32)
    want = x @ jq.fake_quant(w, _spec(qtype))
    tol = 1e-5 * float(jnp.max(jnp.abs(want)))
    qw = quantize_operand(w, cfg.rhs, (0,))
    for tiling in ("never", "always"):
        c = dataclasses.replace(cfg, tiling=tiling)
        np.testing.assert_allclose(jq.dot_general(x, qw, dn, config=c), want, atol=tol)
        np.testing.assert_allclose(jq.dot_general(x, w, dn, config=c), want, atol=tol)
    # int8 activations x ternary/binary codes: the integer product (plain and W4A8-tiled)
    ia = jq.DotGeneralConfig(lhs=QuantSpec(qtype="int8"), rhs=cfg.rhs)
    ref = jq.core.dot_general_reference(x, qw, dn, config=ia)
    for tiling in ("never", "always"):
        y = jq.dot_general(x, qw, dn, config=dataclasses.replace(ia, tiling=tiling))
        np.testing.assert_allclose(y, ref, atol=tol)
