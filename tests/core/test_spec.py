"""QuantSpec and Layout: validation, immutability, axis resolution."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxquant as jq


# --- every bad spec raises ValueError at construction ------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(qtype="int1"), "Unsupported qtype"),  # 1 bit
        (dict(qtype="int9"), "Unsupported qtype"),  # 9 bits
        (dict(qtype="int16"), "Unsupported qtype"),
        (dict(qtype="float32"), "Unsupported qtype"),
        (dict(qtype=jnp.float32), "Unsupported qtype"),
        (dict(qtype=None), "Unsupported qtype"),
        (dict(qtype="int4", group_size=0), "group_size"),
        (dict(qtype="int4", group_size=-128), "group_size"),
        (dict(qtype="int4", group_size=2.0), "group_size"),
        (dict(qtype="int4", group_size="128"), "group_size"),
        (dict(qtype="int4", group_size=True), "group_size"),
        (dict(qtype="int4", group_size=4, group_axis=1, channel_axes=(1,)), "channel axis"),
        (dict(qtype="int4", group_axis=0), "group_axis was given without group_size"),
        (dict(qtype="int4", channel_axes=(0, 0)), "repeated"),
        (dict(qtype="int4", channel_axes=(0.5,)), "channel_axes"),
        (dict(qtype="int4", channel_axes="0"), "channel_axes"),
        (dict(qtype="int4", calibration="max"), "Unknown calibration"),
        (dict(qtype="int4", rounding="floor"), "Unknown rounding"),
        (dict(qtype="fp8_e4m3", symmetric=False), "symmetric=False needs an int qtype"),
        (dict(qtype="fp8_e5m2", symmetric=False), "symmetric=False needs an int qtype"),
        (dict(qtype="nf4", symmetric=False), "symmetric=False needs an int qtype"),
        (dict(qtype="fp4_e2m1", symmetric=False), "symmetric=False needs an int qtype"),
        (dict(qtype="int4", symmetric="no"), "symmetric"),
        (dict(qtype="nf4", rounding="stochastic"), "stochastic"),
        (dict(qtype="int8", percentile=50.0), "percentile"),
        (dict(qtype="int8", percentile=100.5), "percentile"),
        (dict(qtype="int8", percentile=-1), "percentile"),
        (dict(qtype="int8", percentile=float("nan")), "percentile"),
        (dict(qtype="int8", mse_grid=0), "mse_grid"),
        (dict(qtype="int8", mse_min_ratio=1.0), "mse_min_ratio"),
        (dict(qtype="int8", mse_min_ratio=0.0), "mse_min_ratio"),
        (dict(qtype="int8", scale_dtype="int8"), "scale_dtype"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_spec_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jq.QuantSpec(**kwargs)


def test_replace_revalidates():
    spec = jq.QuantSpec(qtype="int4")
    with pytest.raises(ValueError, match="group_size"):
        dataclasses.replace(spec, group_size=0)
    with pytest.raises(ValueError, match="symmetric=False"):
        dataclasses.replace(jq.QuantSpec(qtype="nf4"), symmetric=False)


# --- errors that need the tensor's shape: raised at quantize time ------------------------------
@pytest.mark.parametrize(
    ("kwargs", "shape", "match"),
    [
        (dict(channel_axes=(2,)), (8, 6), "out of range"),
        (dict(channel_axes=(-3,)), (8, 6), "out of range"),
        (dict(group_size=2, group_axis=2), (8, 6), "out of range"),
        (dict(channel_axes=(0, -2)), (8, 6), "same axis"),
        (dict(channel_axes=(1,), group_size=2, group_axis=-1), (8, 6), "channel axis"),
        (dict(group_size=2), (8, 6), "ambiguous"),  # two shared axes, no group_axis
        (dict(channel_axes=(0,), group_size=2), (2, 8, 6), "ambiguous"),
    ],
)
def test_bad_layout_raises_at_quantize_time(kwargs, shape, match):
    spec = jq.QuantSpec(qtype="int4", **kwargs)  # valid on its own
    x = jnp.ones(shape)
    with pytest.raises(ValueError, match=match):
        jq.quantize(x, spec)
    with pytest.raises(ValueError, match=match):
        jq.fake_quant(x, spec)


@given(n=st.integers(2, 64), g=st.integers(2, 64))
def test_group_size_must_divide_the_axis(n, g):
    spec = jq.QuantSpec(qtype="int4", channel_axes=(1,), group_size=g)
    if n % g == 0:
        layout = jq.core.resolve_layout(spec, (n, 3))
        assert layout.scale_shape == (n // g, 3) and layout.group_axis == 0
        return
    with pytest.raises(ValueError) as err:
        jq.core.resolve_layout(spec, (n, 3))
    msg = str(err.value)
    assert f"group_size={g}" in msg and f"size {n}" in msg  # names both sizes
    hint = int(msg.rsplit("e.g. ", 1)[1].rstrip("."))
    assert n % hint == 0  # and suggests a group size that does divide


def test_group_size_error_from_quantize_mentions_sizes():
    spec = jq.QuantSpec(qtype="int4", channel_axes=(1,), group_size=128)
    with pytest.raises(ValueError, match=r"group_size=128 does not divide axis 0 of size 96"):
        jq.quantize(jnp.ones((96, 4)), spec)


# --- frozen, kw_only, hashable -------------------------------------------------------------------
def test_spec_is_frozen_and_kw_only():
    spec = jq.QuantSpec(qtype="int4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.qtype = "int8"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.group_size = 128
    with pytest.raises(TypeError):
        jq.QuantSpec("int4")  # kw_only: positional arguments are refused
    assert all(f.kw_only for f in dataclasses.fields(jq.QuantSpec))


def test_spec_is_hashable_and_usable_as_a_static_argument():
    a = jq.QuantSpec(qtype="int4", channel_axes=[1], group_size=4)
    b = jq.QuantSpec(qtype=jnp.int4, channel_axes=(1,), group_size=4)
    assert a == b and hash(a) == hash(b)  # canonicalised: list -> tuple, dtype -> name
    assert a.channel_axes == (1,) and a.qtype == "int4"
    # Equal specs are one static argument: the second call hits the compilation cache.
    f = jax.jit(chex.assert_max_traces(lambda x, spec: jq.fake_quant(x, spec), n=1),
                static_argnums=1)
    x = jnp.linspace(-1.0, 1.0, 48).reshape(8, 6)
    np.testing.assert_array_equal(np.asarray(f(x, a)), np.asarray(jq.fake_quant(x, b)))
    np.testing.assert_array_equal(np.asarray(f(x, b)), np.asarray(f(x, a)))


def test_int_channel_axes_is_promoted_to_a_tuple():
    assert jq.QuantSpec(qtype="int8", channel_axes=1).channel_axes == (1,)


@pytest.mark.parametrize(
    ("qtype", "name"),
    [
        (jnp.int8, "int8"),
        (jnp.int4, "int4"),
        (jnp.int2, "int2"),
        (jnp.float8_e4m3fn, "fp8_e4m3"),
        (jnp.float8_e5m2, "fp8_e5m2"),
        ("INT4", "int4"),
        ("e4m3", "fp8_e4m3"),
        ("fp4", "fp4_e2m1"),
    ],
)
def test_qtype_aliases(qtype, name):
    assert jq.QuantSpec(qtype=qtype).qtype == name
    assert jq.get_qtype(qtype) is jq.core.QTYPES[name]


# --- formats -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", range(2, 9))
def test_int_format_ranges(n):
    qt = jq.get_qtype(f"int{n}")
    assert (qt.qmin, qt.qmax, qt.bits, qt.max_value) == (
        -(2 ** (n - 1)),
        2 ** (n - 1) - 1,
        n,
        2 ** (n - 1) - 1,
    )
    assert qt.storage_bits == (2 if n == 2 else 4 if n <= 4 else 8)
    assert qt.codes_per_byte * qt.storage_bits == 8


def test_float_formats_use_the_float8_limits():
    for name, dt in [("fp8_e4m3", jnp.float8_e4m3fn), ("fp8_e5m2", jnp.float8_e5m2)]:
        qt = jq.get_qtype(name)
        assert qt.max_value == float(jnp.finfo(dt).max) and qt.storage_dtype == dt
        assert not qt.packed and qt.storage_bits == 8


@pytest.mark.parametrize("name", ["nf4", "fp4_e2m1"])
def test_codebooks_span_minus_one_to_one_with_an_exact_zero(name):
    cb = jq.get_qtype(name).codebook
    assert cb.shape == (16,) and cb.min() == -1.0 and cb.max() == 1.0 and 0.0 in cb
    assert np.all(np.diff(cb) >= 0)  # sorted: quantize_codes bisects the midpoints


def test_fp4_codebook_is_e2m1():
    """The 15 distinct e2m1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, both signs, over 6."""
    e2m1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    expected = (np.union1d(e2m1, -e2m1) / 6.0).astype(np.float32)
    np.testing.assert_array_equal(np.unique(jq.get_qtype("fp4_e2m1").codebook), expected)


# --- Layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "shape", "scale_shape", "group_axis"),
    [
        (dict(), (8, 6), (1, 1), None),
        (dict(channel_axes=(1,)), (8, 6), (1, 6), None),
        (dict(channel_axes=(-1,), group_size=2), (8, 6), (4, 6), 0),
        (dict(group_size=3, group_axis=-1), (8, 6), (1, 2), 1),
        (dict(channel_axes=(0,), group_size=4, group_axis=1), (2, 8, 3), (2, 2, 1), 1),
        (dict(channel_axes=(0, 2)), (2, 8, 3), (2, 1, 3), None),
    ],
)
def test_layout_scale_shape(kwargs, shape, scale_shape, group_axis):
    spec = jq.QuantSpec(qtype="int8", **kwargs)
    layout = jq.core.resolve_layout(spec, shape)
    assert layout.scale_shape == scale_shape and layout.group_axis == group_axis
    assert all(a >= 0 for a in layout.channel_axes)  # normalised
    # quantize agrees (traced only: shapes are all this needs).
    q = jax.eval_shape(lambda x: jq.quantize(x, spec), jax.ShapeDtypeStruct(shape, jnp.float32))
    assert q.scale.shape == scale_shape
