"""Calibration (absmax, minmax, percentile, mse) and precomputed scales: calibrate -> scale and
zero point -> quantize with that scale. Bounds come from numpy references, as in
``test_quantize.py``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from tests.core.helpers import (
    ALL_FORMATS,
    CALIBRATION_CASES,
    EPS32,
    FORMAT_IDS,
    LAYOUTS,
    group_slices,
    spec_for,
)


def _student_t(shape, seed, df=3.0):
    return np.random.default_rng(seed).standard_t(df, size=shape).astype(np.float32)


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_clips_heavy_tails(symmetric):
    x = _student_t((256, 6), seed=4)
    p = 99.0
    spec = jq.QuantSpec(
        qtype="int4", channel_axes=(1,), calibration="percentile", percentile=p, symmetric=symmetric
    )
    layout = jq.core.resolve_layout(spec, x.shape)
    lo, hi = (np.asarray(v)[0] for v in jq.calibrate(jnp.asarray(x), spec, layout))
    if symmetric:
        ref_hi = np.percentile(np.abs(x), p, axis=0)
        ref_lo = -ref_hi
        assert np.all(ref_hi < np.abs(x).max(axis=0))  # really clips: below absmax
    else:
        ref_lo, ref_hi = np.percentile(x, 100 - p, axis=0), np.percentile(x, p, axis=0)
        assert np.all(ref_hi < x.max(axis=0)) and np.all(ref_lo > x.min(axis=0))
    # Float slack: a few ulps of max|x|, plus the float32 error of the fractional rank
    # q / 100 * (n - 1) (about eps * n) times the gap between the two samples it interpolates.
    srt = np.sort(np.abs(x) if symmetric else x, axis=0)
    n = x.shape[0]

    def tol_at(q):
        k = int(q / 100 * (n - 1))
        return 8 * EPS32 * (np.abs(x).max(axis=0) + n * (srt[k + 1] - srt[k]))

    tol = tol_at(p)
    np.testing.assert_array_less(np.abs(hi - ref_hi), tol)
    np.testing.assert_array_less(np.abs(lo - ref_lo), tol if symmetric else tol_at(100 - p))
    # The round trip is within half a step of the *clipped* x.
    qt = spec.qt
    step = (ref_hi - ref_lo) / (2**qt.bits - 1 if not symmetric else 2 * qt.qmax)
    xh = np.asarray(jq.dequantize(jq.quantize(x, spec)))
    err = np.abs(xh - np.clip(x, ref_lo, ref_hi))
    assert np.all(err <= 0.5 * step + 8 * EPS32 * np.abs(x).max(axis=0) + tol)


def _sse_per_entry(x, xh, shape, kw):
    return np.array(
        [((xh[i] - x[i]).astype(np.float64) ** 2).sum() for i in group_slices(shape, kw)]
    )


@functools.partial(jax.jit, static_argnums=1)
@functools.partial(jax.vmap, in_axes=(0, None))
def _mse_and_absmax_round_trips(x, spec):
    absmax = dataclasses.replace(spec, calibration="absmax")
    return jq.dequantize(jq.quantize(x, spec)), jq.dequantize(jq.quantize(x, absmax))


# One compiled, vmapped function per case keeps this cheap: each case checks 24 tensors.
MSE_CASES = [
    ("int2", True, 1),
    ("int4", False, 3),
    ("fp8_e4m3", True, 2),
    ("nf4", True, 5),
]


@pytest.mark.parametrize(("qtype", "symmetric", "layout"), MSE_CASES)
def test_mse_never_worse_than_absmax(qtype, symmetric, layout):
    """The clip search tries ratio 1.0 (absmax) too, so per scale entry it can only do better."""
    shape, kw = LAYOUTS[layout]
    rng = np.random.default_rng(layout)
    batch = 24
    x = rng.standard_t(3.0, size=(batch, *shape)) * 2.0 ** rng.integers(
        -8, 8, size=(batch,) + (1,) * len(shape)
    )
    x = x.astype(np.float32)
    x[0] = 0.0  # an all-zero tensor in the batch too
    mse_out, abs_out = (
        np.asarray(a)
        for a in _mse_and_absmax_round_trips(x, spec_for(qtype, symmetric, kw, calibration="mse"))
    )
    for b in range(batch):
        e_mse = _sse_per_entry(x[b], mse_out[b], shape, kw)
        e_abs = _sse_per_entry(x[b], abs_out[b], shape, kw)
        # Float slack: each element's error may move by a few ulps of max|x| times one step.
        amax = np.array([np.abs(x[b][i]).max() for i in group_slices(shape, kw)], np.float64)
        n = x[b].size / len(amax)
        assert np.all(e_mse <= e_abs + n * 16 * EPS32 * amax**2), (b, e_mse, e_abs)


@pytest.mark.parametrize(("qtype", "symmetric"), [("int3", True), ("int4", True), ("int4", False)])
def test_mse_clips_and_helps_heavy_tails(qtype, symmetric):
    x = _student_t((256, 6), seed=5)
    kw = dict(channel_axes=(1,))
    mse = jq.QuantSpec(qtype=qtype, symmetric=symmetric, calibration="mse", **kw)
    absmax = dataclasses.replace(mse, calibration="absmax")
    e_mse = _sse_per_entry(x, np.asarray(jq.fake_quant(x, mse)), x.shape, kw)
    e_abs = _sse_per_entry(x, np.asarray(jq.fake_quant(x, absmax)), x.shape, kw)
    assert np.all(e_mse <= e_abs) and np.any(e_mse < e_abs)
    q_mse, q_abs = jq.quantize(x, mse), jq.quantize(x, absmax)
    assert np.all(np.asarray(q_mse.scale) <= np.asarray(q_abs.scale))
    assert np.any(np.asarray(q_mse.scale) < np.asarray(q_abs.scale))


@pytest.mark.parametrize(("qtype", "symmetric"), ALL_FORMATS, ids=FORMAT_IDS)
def test_minmax_equals_absmax(qtype, symmetric):
    """Symmetric: minmax's range symmetrised is absmax's. Asymmetric: both are (min, max)."""
    x = _student_t((8, 6), seed=6) + 0.5  # skewed, so min and max differ in magnitude
    spec = jq.QuantSpec(qtype=qtype, symmetric=symmetric, channel_axes=(1,))
    a = jq.quantize(x, spec)
    b = jq.quantize(x, dataclasses.replace(spec, calibration="minmax"))
    for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    layout = jq.core.resolve_layout(spec, x.shape)
    lo, hi = jq.calibrate(jnp.asarray(x), dataclasses.replace(spec, calibration="minmax"), layout)
    if symmetric:
        np.testing.assert_array_equal(np.asarray(hi)[0], np.abs(x).max(axis=0))
        np.testing.assert_array_equal(np.asarray(lo), -np.asarray(hi))
    else:
        np.testing.assert_array_equal(np.asarray(lo)[0], x.min(axis=0))
        np.testing.assert_array_equal(np.asarray(hi)[0], x.max(axis=0))


@pytest.mark.parametrize(("qtype", "symmetric", "calibration"), CALIBRATION_CASES)
def test_precomputed_scale_matches_calibration(qtype, symmetric, calibration):
    x = _student_t((8, 6), seed=7)
    spec = jq.QuantSpec(
        qtype=qtype,
        symmetric=symmetric,
        calibration=calibration,
        channel_axes=(1,),
        group_size=4,
        percentile=95.0,
    )
    layout = jq.core.resolve_layout(spec, x.shape)
    scale, zp = jq.compute_scale(*jq.calibrate(jnp.asarray(x), spec, layout), spec)
    a = jq.quantize(x, spec)
    b = jq.quantize(x, spec, scale=scale, zero_point=zp)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))


def test_static_scale_clips_out_of_range_values():
    """A scale calibrated on one tensor, applied to a larger one, saturates at the grid's ends."""
    x = _student_t((8, 6), seed=8)
    spec = jq.QuantSpec(qtype="int4", channel_axes=(1,))
    layout = jq.core.resolve_layout(spec, x.shape)
    scale, _ = jq.compute_scale(*jq.calibrate(jnp.asarray(x), spec, layout), spec)
    q = jq.quantize(3 * x, spec, scale=scale)
    codes = np.asarray(q.codes())
    assert codes.min() == -7 and codes.max() == 7  # symmetric int4 grid is [-qmax, qmax]
    xh = np.asarray(q.dequantize())
    s = np.asarray(scale)
    np.testing.assert_array_equal(np.abs(xh).max(axis=0), 7 * s[0])


def test_precomputed_scale_validation():
    x = jnp.ones((8, 6))
    spec = jq.QuantSpec(qtype="int8", channel_axes=(1,))
    with pytest.raises(ValueError, match=r"\(1, 6\)"):
        jq.quantize(x, spec, scale=jnp.ones((6,)))
    with pytest.raises(ValueError, match="shape"):
        jq.quantize(x, spec, scale=jnp.ones((8, 1)))
    with pytest.raises(ValueError, match="zero_point"):
        jq.quantize(x, spec, scale=jnp.ones((1, 6)), zero_point=jnp.zeros((1, 6)))
    asym = dataclasses.replace(spec, symmetric=False)
    with pytest.raises(ValueError, match="zero_point"):
        jq.quantize(x, asym, scale=jnp.ones((1, 6)))
