"""quantize / dequantize / QArray: properties derived from the quantization step.

Every bound here is computed from ``x`` by an independent numpy reference (:func:`group_stat`
loops over the scale grid explicitly), never from the implementation's own scale, so a wrong
scale cannot loosen the bound it is checked against. Calibration is in ``test_calibration.py``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxquant as jq
from jaxquant.core.qtypes import FP4_CODEBOOK, NF4_CODEBOOK
from tests.core.helpers import (
    ALL_FORMATS,
    CALIBRATION_CASES,
    EPS32,
    FORMAT_IDS,
    LAYOUTS,
    group_slices,
    spec_for,
)


# --- independent numpy reference -----------------------------------------------------------------
def group_stat(x, shape, kw, fn):
    """``fn`` over each element's group, broadcast back to every element (numpy reference)."""
    x = np.asarray(x, np.float64)
    out = np.empty(x.shape, np.float64)
    for idx in group_slices(shape, kw):
        out[idx] = fn(x[idx])
    return out


def reference_bound(x, qtype, symmetric, shape, kw):
    """Per-element round-trip bound: half a step of the format, from ``x`` alone, plus float slack.

    * int, symmetric: step = max|x| / (2**(N-1) - 1).
    * int, asymmetric: step = (max - min) / (2**N - 1).
    * fp8: the scale maps max|x| onto the format's max; the error is half an ulp of the float8
      format at the scaled magnitude (subnormals: half the subnormal step), times the scale.
    * nf4 / fp4: the scale is max|x|; the error is half the gap between the two codebook entries
      around the scaled value, times the scale.

    The slack covers float32 rounding of ``x / scale`` and ``code * scale``: a few ulps of the
    largest magnitude the computation passes through.
    """
    qt = jq.get_qtype(qtype)
    x = np.asarray(x, np.float64)
    amax = group_stat(x, shape, kw, lambda v: np.abs(v).max())
    if qt.kind is jq.QKind.INT and not symmetric:
        lo = group_stat(x, shape, kw, np.min)
        hi = group_stat(x, shape, kw, np.max)
        step = (hi - lo) / (2**qt.bits - 1)
        return 0.5 * step + 8 * EPS32 * (amax + step * 2**qt.bits)
    slack = 8 * EPS32 * amax
    if qt.kind is jq.QKind.INT:
        return 0.5 * amax / qt.qmax + slack
    if qt.kind is jq.QKind.FLOAT:
        fi = jnp.finfo(qt.storage_dtype)
        scale = amax / float(fi.max)
        v = np.abs(np.divide(x, scale, out=np.zeros_like(x), where=scale > 0))
        with np.errstate(divide="ignore"):
            e = np.floor(np.log2(np.maximum(v, np.finfo(np.float64).tiny)))
        e = np.maximum(e, fi.minexp)  # below the normal range the step is the subnormal one
        half_ulp = 2.0 ** (e - fi.nmant - 1)
        return half_ulp * scale + slack
    cb = qt.codebook.astype(np.float64)
    scale = amax
    v = np.clip(np.divide(x, scale, out=np.zeros_like(x), where=scale > 0), -1.0, 1.0)
    i = np.clip(np.searchsorted(cb, v, side="right") - 1, 0, len(cb) - 2)
    return 0.5 * (cb[i + 1] - cb[i]) * scale + slack


def float_arrays(shape):
    """x = u * 2**k with u in [-1, 1] (zeros included) and one magnitude per example.

    |u| below 2**-30 is flushed to zero: a group that tiny would need a float32-subnormal scale,
    which XLA's CPU backend flushes to zero (out of scope for a quantizer).
    """
    elems = st.floats(-1.0, 1.0, width=32).map(lambda v: 0.0 if abs(v) < 2.0**-30 else v)
    return st.tuples(hnp.arrays(np.float32, shape, elements=elems), st.integers(-8, 8)).map(
        lambda t: (t[0] * np.float32(2.0 ** t[1])).astype(np.float32)
    )


@st.composite
def layout_and_x(draw):
    shape, kw = draw(st.sampled_from(LAYOUTS))
    return shape, kw, draw(float_arrays(shape))


# --- round trip within half a step -----------------------------------------------------------
@pytest.mark.parametrize(("qtype", "symmetric"), ALL_FORMATS, ids=FORMAT_IDS)
@given(case=layout_and_x())
def test_round_trip_within_half_step(qtype, symmetric, case):
    shape, kw, x = case
    q = jq.quantize(x, spec_for(qtype, symmetric, kw))
    xh = np.asarray(jq.dequantize(q), np.float64)
    assert xh.shape == x.shape and q.shape == x.shape
    assert np.all(np.isfinite(xh))
    err = np.abs(xh - x)
    bound = reference_bound(x, qtype, symmetric, shape, kw)
    worst = np.unravel_index(np.argmax(err - bound), x.shape)
    assert np.all(err <= bound), (
        f"{qtype} sym={symmetric} {kw}: error {err[worst]} > bound {bound[worst]} at {worst}"
    )
    if jq.get_qtype(qtype).kind is jq.QKind.INT:
        _check_int_scale_is_the_step(q, x, qtype, symmetric, shape, kw)


def _check_int_scale_is_the_step(q, x, qtype, symmetric, shape, kw):
    """The stored scale is the documented step: max|x|/qmax, or (max - min)/(2**N - 1)."""
    qt = jq.get_qtype(qtype)
    scale = np.broadcast_to(np.asarray(q.scale, np.float64), q.layout.scale_shape)
    for k, idx in enumerate(group_slices(shape, kw)):
        g = x[idx].astype(np.float64)
        step = np.abs(g).max() / qt.qmax if symmetric else (g.max() - g.min()) / (2**qt.bits - 1)
        got = scale.reshape(-1)[k]
        if step == 0:
            # All-zero group: a harmless unit scale. Constant asymmetric group c: scale |c|,
            # so that c / scale = +-1 and the zero point are exact small integers.
            assert got == (1.0 if symmetric or not g.any() else abs(g.flat[0])), (idx, got)
        else:
            assert abs(got - step) <= 2 * EPS32 * step, (idx, got, step)


# --- values already on the grid come back exactly ------------------------------------------------
def _group_powers(draw, shape, kw):
    return [draw(st.integers(-6, 6)) for _ in group_slices(shape, kw)]


@pytest.mark.parametrize("qtype", [f"int{n}" for n in range(2, 9)])
@given(data=st.data())
def test_on_grid_symmetric_int_is_exact(qtype, data):
    shape, kw = data.draw(st.sampled_from(LAYOUTS))
    qt = jq.get_qtype(qtype)
    codes = data.draw(hnp.arrays(np.int32, shape, elements=st.integers(-qt.qmax, qt.qmax)))
    x = np.zeros(shape, np.float32)
    for idx, k in zip(group_slices(shape, kw), _group_powers(data.draw, shape, kw), strict=True):
        c = codes[idx]  # a view: the forced extreme is written back into `codes`
        c.flat[0] = qt.qmax * data.draw(st.sampled_from([-1, 1]))  # absmax recovers 2**k
        x[idx] = c * np.float32(2.0**k)
    q = jq.quantize(x, spec_for(qtype, True, kw))
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), x)
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)


@pytest.mark.parametrize("qtype", [f"int{n}" for n in range(2, 9)])
@given(data=st.data())
def test_on_grid_asymmetric_int_is_exact(qtype, data):
    shape, kw = data.draw(st.sampled_from(LAYOUTS))
    qt = jq.get_qtype(qtype)
    levels = 2**qt.bits - 1
    x = np.zeros(shape, np.float32)
    for idx, k in zip(group_slices(shape, kw), _group_powers(data.draw, shape, kw), strict=True):
        lo = data.draw(st.integers(-2 * levels, levels))  # the range need not contain zero
        n = x[idx].size
        c = np.array(data.draw(st.lists(st.integers(lo, lo + levels), min_size=n, max_size=n)))
        c[0], c[-1] = lo, lo + levels  # both extremes present: minmax recovers the grid
        x[idx] = c.reshape(x[idx].shape) * np.float32(2.0**k)
    q = jq.quantize(x, spec_for(qtype, False, kw))
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), x)


@pytest.mark.parametrize(
    ("qtype", "table"), [("nf4", NF4_CODEBOOK), ("fp4_e2m1", FP4_CODEBOOK)], ids=["nf4", "fp4"]
)
@given(data=st.data())
def test_on_grid_codebook_is_exact(qtype, table, data):
    shape, kw = data.draw(st.sampled_from(LAYOUTS))
    idx_all = data.draw(hnp.arrays(np.int32, shape, elements=st.integers(0, len(table) - 1)))
    ends = [int(np.argmin(table)), int(np.argmax(table))]  # the entries -1 and +1
    x = np.zeros(shape, np.float32)
    for idx, k in zip(group_slices(shape, kw), _group_powers(data.draw, shape, kw), strict=True):
        i = idx_all[idx].copy()
        i.flat[0] = data.draw(st.sampled_from(ends))
        x[idx] = table[i] * np.float32(2.0**k)
    q = jq.quantize(x, spec_for(qtype, True, kw))
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), x)


@pytest.mark.parametrize("qtype", ["fp8_e4m3", "fp8_e5m2"])
@given(data=st.data())
def test_on_grid_fp8_is_exact(qtype, data):
    shape, kw = data.draw(st.sampled_from(LAYOUTS))
    dt = jq.get_qtype(qtype).storage_dtype
    grid = np.arange(256, dtype=np.uint8).view(dt).astype(np.float32)
    grid = np.unique(grid[np.isfinite(grid)])  # every finite float8 value, subnormals included
    fmax = float(jnp.finfo(dt).max)
    pick = data.draw(hnp.arrays(np.int32, shape, elements=st.integers(0, len(grid) - 1)))
    x = np.zeros(shape, np.float32)
    for idx, k in zip(group_slices(shape, kw), _group_powers(data.draw, shape, kw), strict=True):
        v = grid[pick[idx]]
        v.flat[0] = fmax * data.draw(st.sampled_from([-1, 1]))
        x[idx] = v * np.float32(2.0**k)
    q = jq.quantize(x, spec_for(qtype, True, kw))
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), x)


# --- all-zero tensors and groups -----------------------------------------------------------------
@pytest.mark.parametrize(("qtype", "symmetric", "calibration"), CALIBRATION_CASES)
def test_all_zero_gives_zeros(qtype, symmetric, calibration):
    spec = jq.QuantSpec(
        qtype=qtype, symmetric=symmetric, calibration=calibration, channel_axes=(1,), group_size=4
    )
    zeros = np.zeros((8, 6), np.float32)
    np.testing.assert_array_equal(np.asarray(jq.dequantize(jq.quantize(zeros, spec))), zeros)
    np.testing.assert_array_equal(np.asarray(jq.fake_quant(zeros, spec)), zeros)
    # One all-zero group among non-zero ones: zeros there, still finite everywhere.
    x = np.linspace(-1.0, 1.0, 48, dtype=np.float32).reshape(8, 6)
    x[4:, 1] = 0.0
    xh = np.asarray(jq.dequantize(jq.quantize(x, spec)))
    assert np.all(np.isfinite(xh))
    np.testing.assert_array_equal(xh[4:, 1], 0.0)


def test_zero_is_exact_for_symmetric_formats():
    """Symmetric grids contain zero: exact zeros in x stay exact zeros."""
    x = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    x[::2, 1::2] = 0.0
    for qtype, symmetric in ALL_FORMATS:
        if symmetric:
            xh = np.asarray(jq.dequantize(jq.quantize(x, jq.QuantSpec(qtype=qtype))))
            np.testing.assert_array_equal(xh[x == 0], 0.0, err_msg=qtype)


# --- NaN / inf ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_non_finite_raises_eagerly(bad, dtype):
    x = jnp.ones((8, 6), dtype).at[2, 1].set(bad)
    with pytest.raises(ValueError, match=r"non-finite.*\(2, 1\)"):
        jq.quantize(x, jq.QuantSpec(qtype="int8"))
    with pytest.raises(ValueError, match="non-finite"):
        jq.core.check_finite(x)


@pytest.mark.parametrize(
    "spec",
    [
        jq.QuantSpec(qtype="int4", channel_axes=(1,)),
        jq.QuantSpec(qtype="int4", channel_axes=(1,), symmetric=False, calibration="minmax"),
        jq.QuantSpec(qtype="int3", channel_axes=(1,), calibration="mse"),
        jq.QuantSpec(qtype="int8", channel_axes=(1,), calibration="percentile", percentile=90.0),
        jq.QuantSpec(qtype="fp8_e4m3", channel_axes=(1,)),
        jq.QuantSpec(qtype="nf4", channel_axes=(1,), group_size=4),
        jq.QuantSpec(qtype="int2", group_size=4, group_axis=0, symmetric=False),
    ],
    ids=lambda s: f"{s.qtype}-{s.calibration}-g{s.group_size}-{'sym' if s.symmetric else 'asym'}",
)
def test_nan_under_jit_stays_in_its_group(spec):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    # The same compiled function on clean and poisoned data: only the NaN differs.
    round_trip = jax.jit(lambda v: jq.dequantize(jq.quantize(v, spec)))
    clean = np.asarray(round_trip(x))
    x_bad = x.copy()
    x_bad[1, 2] = np.nan
    got = np.asarray(round_trip(x_bad))
    # The elements sharing a scale with [1, 2]: column 2 (per channel) or its group of rows.
    kw = dict(
        channel_axes=spec.channel_axes, group_size=spec.group_size, group_axis=spec.group_axis
    )
    touched = np.zeros(x.shape, bool)
    for idx in group_slices(x.shape, kw):
        if np.isnan(x_bad[idx]).any():
            touched[idx] = True
    assert touched.sum() < x.size
    np.testing.assert_array_equal(got[~touched], clean[~touched])


def test_check_finite_is_a_no_op_while_tracing():
    out = jax.jit(lambda v: (jq.core.check_finite(v), v * 2)[1])(jnp.array([jnp.nan, 1.0]))
    assert np.isnan(out[0]) and out[1] == 2.0


def test_non_float_input_raises():
    with pytest.raises(ValueError, match="float"):
        jq.quantize(jnp.arange(8), jq.QuantSpec(qtype="int8"))


# --- QArray ----------------------------------------------------------------------------------
def test_qarray_is_a_pytree_with_static_metadata():
    x = jnp.linspace(-1, 1, 48).reshape(8, 6)
    q = jq.quantize(x, jq.QuantSpec(qtype="int4", channel_axes=(1,), symmetric=False))
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 3
    assert leaves[0] is q.qvalue and leaves[1] is q.scale and leaves[2] is q.zero_point
    sym = jq.quantize(x, jq.QuantSpec(qtype="int4", channel_axes=(1,)))
    assert jax.tree_util.tree_leaves(sym) == [sym.qvalue, sym.scale]  # zero_point None: no leaf
    # Metadata lives in the treedef: round trips through flatten/unflatten and tree_map.
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (back.qtype, back.shape, back.dtype, back.channel_axes, back.pack_axis) == (
        q.qtype,
        q.shape,
        q.dtype,
        q.channel_axes,
        q.pack_axis,
    )
    same = jax.tree_util.tree_map(lambda a: a, q)
    assert isinstance(same, jq.QArray) and same.qtype == "int4" and same.pack_axis == q.pack_axis
    int8 = jq.quantize(x, jq.QuantSpec(qtype="int8", channel_axes=(1,), symmetric=False))
    assert jax.tree_util.tree_structure(int8) != treedef  # qtype is static, not traced
    # jit accepts and returns a QArray; the metadata is not traced.
    out = jax.jit(lambda a: a)(q)
    assert out.qtype == "int4" and out.shape == (8, 6)
    np.testing.assert_array_equal(np.asarray(out.dequantize()), np.asarray(q.dequantize()))


def test_qarray_is_immutable():
    q = jq.quantize(jnp.ones((8, 6)), jq.QuantSpec(qtype="int8"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.scale = jnp.ones((1, 1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.qtype = "int4"


@pytest.mark.parametrize(("qtype", "symmetric"), ALL_FORMATS, ids=FORMAT_IDS)
def test_method_dequantize_equals_function(qtype, symmetric):
    x = np.random.default_rng(1).standard_normal((8, 6)).astype(np.float32)
    q = jq.quantize(x, jq.QuantSpec(qtype=qtype, symmetric=symmetric, channel_axes=(1,)))
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(jq.dequantize(q)))
    assert q.dequantize().dtype == jnp.float32
    assert q.dequantize(jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(TypeError):
        jq.dequantize(x)


_NBYTES_CASES = [
    ("int8", 8, dict(channel_axes=(1,))),
    ("fp8_e4m3", 8, dict(channel_axes=(1,))),
    ("int4", 4, dict(channel_axes=(1,))),
    ("int4", 4, dict(channel_axes=(1,), group_size=128)),
    ("int3", 4, dict(channel_axes=(1,), group_size=64)),  # int3 rides in a nibble
    ("nf4", 4, dict(channel_axes=(1,), group_size=64)),
    ("int2", 2, dict(channel_axes=(1,))),
    ("int2", 2, dict(channel_axes=(1,), group_size=128)),
]


# Asymmetric (zero-point) storage exists only for int formats.
@pytest.mark.parametrize(
    ("qtype", "code_bits", "kw", "symmetric"),
    [(*c, True) for c in _NBYTES_CASES]
    + [(*c, False) for c in _NBYTES_CASES if jq.get_qtype(c[0]).kind is jq.QKind.INT],
)
def test_nbytes_is_true_storage(qtype, code_bits, kw, symmetric):
    rows, cols = 256, 6
    spec = jq.QuantSpec(qtype=qtype, symmetric=symmetric, **kw)
    # Storage depends on shapes and dtypes only: trace quantize instead of running it.
    x = jax.ShapeDtypeStruct((rows, cols), jnp.float32)
    q = jax.eval_shape(functools.partial(jq.quantize, spec=spec), x)
    n_scales = cols * (rows // kw.get("group_size", rows))
    per_scale = 4 * (1 if symmetric else 2)  # float32 scale (+ float32 zero point)
    expected = rows * cols * code_bits // 8 + n_scales * per_scale
    assert q.nbytes == expected
    assert q.bits_per_element == pytest.approx(8 * expected / (rows * cols))


def test_packed_storage_padding_and_codes():
    x = np.random.default_rng(2).standard_normal((8, 6)).astype(np.float32)
    for qtype, per_byte in [("int4", 2), ("int3", 2), ("int2", 4), ("nf4", 2)]:
        spec = jq.QuantSpec(qtype=qtype, channel_axes=(0,))  # packs the axis of 6
        q = jq.quantize(x, spec)
        assert q.qvalue.dtype == jnp.uint8 and q.pack_axis == 1
        assert q.qvalue.shape == (8, -(-6 // per_byte))  # int2: 6 codes pad to 8, 2 bytes
        unpacked = jq.quantize(x, spec, pack=False)
        assert unpacked.pack_axis is None and unpacked.qvalue.shape == (8, 6)
        for a in (q, unpacked):  # nbytes counts what the arrays really hold
            assert a.nbytes == sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(a))
        # 8 rows of ceil(6 / codes per byte) bytes, plus 8 float32 scales (one per row).
        assert q.nbytes == 8 * -(-6 // per_byte) + 8 * 4
        assert unpacked.nbytes == 8 * 6 + 8 * 4
        np.testing.assert_array_equal(np.asarray(q.codes()), np.asarray(unpacked.qvalue))
        np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(unpacked.dequantize()))


def test_scalar_and_bfloat16_inputs():
    for qtype in ("int8", "int4", "int2", "nf4", "fp8_e4m3"):
        q = jq.quantize(jnp.float32(-1.5), jq.QuantSpec(qtype=qtype))
        assert q.shape == () and float(q.dequantize()) == -1.5  # absmax puts it on the grid
    # bfloat16 codes * 2**-6 with the max code 127 present: on the int8 grid, so exact.
    x = jnp.array([127.0, -64.0, 3.0, -127.0, 0.0, 5.0], jnp.bfloat16) * 2.0**-6
    x = jnp.tile(x, (8, 1))
    q = jq.quantize(x, jq.QuantSpec(qtype="int8"))
    assert q.dtype == jnp.bfloat16 and q.dequantize().dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(x))


def test_dtype_qtypes_match_names():
    x = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    for dt, name in [(jnp.int8, "int8"), (jnp.int4, "int4"), (jnp.float8_e4m3fn, "fp8_e4m3")]:
        a = jq.quantize(x, jq.QuantSpec(qtype=dt))
        b = jq.quantize(x, jq.QuantSpec(qtype=name))
        assert a.qtype == name
        np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(b.dequantize()))


# --- stochastic rounding -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("qtype", "symmetric", "calibration"),
    [("int2", True, "absmax"), ("int4", False, "minmax"), ("int3", True, "mse")],
)
def test_stochastic_rounding_is_unbiased(qtype, symmetric, calibration):
    x = np.random.default_rng(9).standard_normal((8, 6)).astype(np.float32)
    spec = jq.QuantSpec(
        qtype=qtype,
        symmetric=symmetric,
        calibration=calibration,
        channel_axes=(1,),
        rounding="stochastic",
    )
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(
        jax.jit(jax.vmap(lambda k: jq.dequantize(jq.quantize(x, spec, key=k))))(keys)
    )
    # Each draw is one of the two grid points around x (1 step apart): variance <= step**2 / 4.
    step = np.asarray(jq.quantize(x, spec, key=keys[0]).scale, np.float64)
    nearest = np.asarray(
        jq.dequantize(jq.quantize(x, dataclasses.replace(spec, rounding="nearest")))
    )
    slack = 8 * EPS32 * (np.abs(x).max(axis=0) + step * 2**spec.bits)
    assert np.all(np.abs(draws - x) <= step + slack)
    # Unbiased for the x the grid can reach: mse may clip the range to [-qmax, qmax] * step.
    qt = spec.qt
    if symmetric:
        x = np.clip(x, -qt.qmax * step, qt.qmax * step)
    bound = 5 * step / (2 * np.sqrt(n))
    assert np.all(np.abs(draws.mean(axis=0) - x) <= bound)
    # It is really stochastic, and differs from round-to-nearest's biased result.
    assert np.any(draws.std(axis=0) > 0)
    assert np.any(np.abs(nearest - x) > bound)


def test_stochastic_rounding_needs_a_key():
    spec = jq.QuantSpec(qtype="int4", rounding="stochastic")
    with pytest.raises(ValueError, match="key"):
        jq.quantize(jnp.ones((8, 6)), spec)
    with pytest.raises(ValueError, match="key"):
        jq.fake_quant(jnp.ones((8, 6)), spec)
    x = jnp.linspace(-1, 1, 48).reshape(8, 6)
    a = jq.quantize(x, spec, key=jax.random.key(1))
    b = jq.quantize(x, spec, key=jax.random.key(1))
    np.testing.assert_array_equal(
        np.asarray(a.qvalue), np.asarray(b.qvalue)
    )  # same key, same codes
