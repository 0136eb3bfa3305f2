"""The quantized ``dot_general``: agreement with its definition, error bounds, jaxpr, serving.

Tolerances are derived, never pasted:

* fast path vs :func:`jq.dot_general_reference` (quantize, dequantize, float dot): the two differ
  only by float reassociation, so ``|y - y_ref| <= 2 (K + 4) eps (|lhat| . |rhat|)``;
* quantized vs float product: with elementwise quantization errors ``|x - xhat| <= dx`` and
  ``|w - what| <= dw`` (half a step for round-to-nearest),
  ``|xhat . what - x . w| <= |x| . dw + dx . |w| + dx . dw``, computed with the same dimension
  numbers from the actual scales.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax import lax

import jaxquant as jq

MM = (((1,), (0,)), ((), ()))  # [M, K] x [K, N] -> [M, N]
HIGHEST = lax.Precision.HIGHEST

GROUPED_8x4 = jq.DotGeneralConfig(
    lhs=jq.QuantSpec(qtype="int8", group_size=32),
    rhs=jq.QuantSpec(qtype="int4", group_size=32),
)

CONFIGS = {
    "w8a8": jq.w8a8(),
    "wo_int8": jq.weight_only("int8"),
    "wo_int4_g32": jq.weight_only("int4", group_size=32),
    "wo_nf4_g64": jq.weight_only("nf4", group_size=64),
    "wo_int4_g32_asym": jq.weight_only("int4", group_size=32, symmetric=False),
    "fully_quantized": jq.fully_quantized(),
    "fp8": jq.fp8(),
    "grouped_int8_x_int4": GROUPED_8x4,
}


# --- helpers (also imported by the other dot_general test files) ------------------------------


def rand(seed: int, shape, row_spread: float = 0.0, axis: int = 0, dtype=jnp.float32):
    """Normal values; ``row_spread`` > 0 gives slices along ``axis`` magnitudes spanning
    ``10**row_spread``, so a per-row scale differs a lot from a per-tensor one."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if row_spread:
        mags = 10.0 ** rng.uniform(-row_spread, 0.0, shape[axis])
        x = x * np.expand_dims(mags, tuple(a for a in range(len(shape)) if a != axis))
    return jnp.asarray(x.astype(np.float32), dtype)


@functools.partial(jax.jit, static_argnums=(0, 3))
def qdot(cfg, x, w, dn=MM):
    """``jq.dot_general`` under ``jit`` (tests run eagerly only where that is the point)."""
    return jq.dot_general(x, w, dn, config=cfg)


def contracting_size(shape, axes) -> int:
    return int(np.prod([shape[a] for a in axes]))


def full_scale(q: jq.QArray) -> jax.Array:
    """``q.scale`` expanded to ``q.shape`` (groups repeated along the grouped axis)."""
    s = q.scale.astype(jnp.float32)
    if q.group_size is not None:
        s = jnp.repeat(s, q.group_size, axis=q.group_axis)
    return jnp.broadcast_to(s, q.shape)


def half_step(q: jq.QArray, x=None) -> jax.Array:
    """Elementwise bound on ``|x - dequantize(q)|`` for round-to-nearest, from ``q``'s scales.

    ints: half a step (``scale / 2``); codebooks: half the widest gap of the table times the
    scale; fp8: half an ulp relative to ``|x|`` plus half the smallest subnormal.
    """
    qt = jq.get_qtype(q.qtype)
    s = full_scale(q)
    if qt.kind is jq.QKind.INT:
        return s / 2
    if qt.kind is jq.QKind.CODEBOOK:
        cb = np.unique(np.asarray(qt.codebook, np.float64))
        return s * float(np.max(np.diff(cb))) / 2
    fi = jnp.finfo(qt.storage_dtype)
    rel = 2.0 ** -(fi.nmant + 1)
    return rel * jnp.abs(x.astype(jnp.float32)) + s * float(fi.smallest_subnormal) / 2


def dg(a, b, dn):
    return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dn, precision=HIGHEST)


@functools.partial(jax.jit, static_argnums=(2,))
def reassoc_tol(lhat, rhat, dn) -> jax.Array:
    """Elementwise bound on the difference of two float evaluations of ``lhat . rhat``."""
    (lc, _), _ = dn
    k = contracting_size(lhat.shape, lc)
    eps = float(jnp.finfo(jnp.float32).eps)
    return 2 * (k + 4) * eps * dg(jnp.abs(lhat), jnp.abs(rhat), dn) + 1e-30


@functools.partial(jax.jit, static_argnums=(4,))
def product_error_bound(x, dx, w, dw, dn) -> jax.Array:
    """``|x| . dw + dx . |w| + dx . dw`` plus the float slack of the two products."""
    ax, aw = jnp.abs(x.astype(jnp.float32)), jnp.abs(w.astype(jnp.float32))
    bound = dg(ax, dw, dn) + dg(dx, aw, dn) + dg(dx, dw, dn)
    return bound + reassoc_tol(ax + dx, aw + dw, dn)


@functools.partial(jax.jit, static_argnums=(0, 3))
def dequantized_operands(cfg, x, w, dn):
    """``(xhat, dx, what, dw)`` exactly as the config quantizes the operands (dx = 0 for float)."""
    (lc, rc), _ = dn
    out = []
    for v, spec, c in ((x, cfg.lhs, lc), (w, cfg.rhs, rc)):
        if spec is None:
            out += [v.astype(jnp.float32), jnp.zeros(v.shape, jnp.float32)]
        else:
            q = jq.core.quantize_operand(v, spec, c)
            out += [q.dequantize(jnp.float32), half_step(q, v)]
    return tuple(out)


class Analysis(NamedTuple):
    xhat: jax.Array  # dequantized operands, as the config quantizes them
    what: jax.Array
    ref: jax.Array  # jq.dot_general_reference
    definition: jax.Array  # float product of xhat and what, computed here
    exact: jax.Array  # float product of x and w
    tol: jax.Array  # reassociation tolerance of products of xhat and what
    bound: jax.Array  # bound on |quantized product - exact|


@functools.partial(jax.jit, static_argnums=(0, 3))
def analyze(cfg, x, w, dn=MM) -> Analysis:
    """Everything a test compares ``jq.dot_general`` against, in one compiled function."""
    xhat, dx, what, dw = dequantized_operands(cfg, x, w, dn)
    return Analysis(
        xhat=xhat,
        what=what,
        ref=jq.dot_general_reference(x, w, dn, config=cfg),
        definition=dg(xhat, what, dn),
        exact=dg(x, w, dn),
        tol=reassoc_tol(xhat, what, dn),
        bound=product_error_bound(x, dx, w, dw, dn),
    )


def all_eqns(jaxpr):
    """Every equation of a (closed) jaxpr, recursing into sub-jaxprs (jit, custom_vjp, ...)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jex.core.jaxprs_in_params(eqn.params):
            yield from all_eqns(sub)


def dot_eqns(fn, *args):
    """``[(lhs dtype, rhs dtype, preferred_element_type)]`` of every ``dot_general`` traced."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [
        (e.invars[0].aval.dtype, e.invars[1].aval.dtype, e.params.get("preferred_element_type"))
        for e in all_eqns(jaxpr)
        if e.primitive.name == "dot_general"
    ]


def assert_within(actual, expected, tol, what=""):
    err = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))
    tol = np.asarray(tol, np.float64)
    bad = err > tol
    assert not bad.any(), (
        f"{what}: {bad.sum()} / {bad.size} elements out of bound; worst excess "
        f"{float(np.max(err - tol)):.3g} (err {float(err.max()):.3g}, tol at worst "
        f"{float(tol.flat[np.argmax(err - tol)]):.3g})"
    )


# --- agreement with the reference ------------------------------------------------------------


class MatchesReferenceTest(chex.TestCase):
    """The fast path, jitted and not (chex variants), against the independent reference."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((name, name) for name in CONFIGS))
    def test_matches_reference_and_error_bound(self, name):
        cfg = CONFIGS[name]
        # Rows of x and columns of w span two decades: a per-tensor scale would break the bound.
        x, w = rand(0, (16, 128), 2.0, axis=0), rand(1, (128, 24), 2.0, axis=1)
        y = self.variant(lambda a, b: jq.dot_general(a, b, MM, config=cfg))(x, w)
        a = analyze(cfg, x, w)
        chex.assert_shape([y, a.ref], (16, 24))
        chex.assert_type(y, jnp.float32)
        assert_within(y, a.ref, a.tol, f"{name} fast path vs reference")
        # The reference itself is "dequantize, then float dot" of the operands quantized per
        # row / column (or group), computed here independently of dot_general.
        assert_within(a.ref, a.definition, a.tol, f"{name} reference vs definition")
        assert_within(y, a.exact, a.bound, f"{name} vs float, bounded by the steps")
        assert float(jnp.max(jnp.abs(y - a.exact))) > 0  # it really quantized


def test_operand_scale_layout():
    x, w = rand(0, (16, 128)), rand(1, (128, 24))
    assert jq.core.quantize_operand(x, jq.w8a8().lhs, (1,)).scale.shape == (16, 1)
    assert jq.core.quantize_operand(w, jq.w8a8().rhs, (0,)).scale.shape == (1, 24)
    q = jq.core.quantize_operand(w, jq.weight_only("int4", group_size=32).rhs, (0,))
    assert q.scale.shape == (4, 24) and q.group_axis == 0
    # The operand spec is the ordinary QuantSpec with channel axes = the non-contracting axes.
    direct = jq.quantize(w, jq.QuantSpec(qtype="int4", channel_axes=(1,), group_size=32))
    np.testing.assert_array_equal(q.dequantize(), direct.dequantize())


def test_w8a8_row_scales_matter():
    """The bound above is tight enough to see per-tensor scales: quantizing x with one scale
    breaks it on the small rows (guards the test against being vacuous)."""
    x, w = rand(0, (16, 128), 2.0, axis=0), rand(1, (128, 24), 2.0, axis=1)
    a = analyze(jq.w8a8(), x, w)
    xt = jq.quantize(x, jq.QuantSpec(qtype="int8")).dequantize()  # one scale for all of x
    wrong = dg(xt, a.what, MM)
    assert (np.abs(wrong - a.exact) > a.bound).any()


# --- config=None is lax.dot_general -----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"precision": HIGHEST}, {"preferred_element_type": jnp.float32}],
    ids=["plain", "precision", "preferred"],
)
def test_config_none_is_lax(kwargs):
    x, w = rand(0, (4, 8, 16)), rand(1, (4, 16, 5))
    dn = (((2,), (1,)), ((0,), (0,)))
    f = lambda a, b: jq.dot_general(a, b, dn, config=None, **kwargs)
    g = lambda a, b: lax.dot_general(a, b, dn, **kwargs)
    np.testing.assert_array_equal(f(x, w), g(x, w))
    assert str(jax.make_jaxpr(f)(x, w)) == str(jax.make_jaxpr(g)(x, w))


def test_config_none_bf16_is_lax():
    x, w = rand(0, (8, 16), dtype=jnp.bfloat16), rand(1, (16, 4), dtype=jnp.bfloat16)
    y = jq.dot_general(x, w, MM)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, lax.dot_general(x, w, MM))


# --- jaxpr: what the product really runs on ---------------------------------------------------


def test_w8a8_jaxpr_has_int8_dot_with_int32_accumulation():
    x, w = rand(0, (16, 64)), rand(1, (64, 8))
    f = jax.jit(lambda a, b: jq.dot_general(a, b, MM, config=jq.w8a8()))
    dots = dot_eqns(f, x, w)
    assert dots, "no dot_general traced"
    assert all(d == (jnp.int8, jnp.int8, jnp.int32) for d in dots), dots


def test_grouped_int8_x_int4_runs_on_int8_codes():
    x, w = rand(0, (16, 64)), rand(1, (64, 8))
    dots = dot_eqns(jax.jit(lambda a, b: jq.dot_general(a, b, MM, config=GROUPED_8x4)), x, w)
    assert dots and all(d == (jnp.int8, jnp.int8, jnp.int32) for d in dots), dots


def test_fp8_jaxpr_has_float8_dot():
    x, w = rand(0, (16, 64)), rand(1, (64, 8))
    dots = dot_eqns(jax.jit(lambda a, b: jq.dot_general(a, b, MM, config=jq.fp8())), x, w)
    assert dots and all(d[0] == jnp.float8_e4m3fn and d[1] == jnp.float8_e4m3fn for d in dots), dots


@pytest.mark.parametrize("name", ["wo_int8", "wo_int4_g32", "wo_nf4_g64"])
def test_weight_only_has_no_int_dot(name):
    x, w = rand(0, (16, 64)), rand(1, (64, 8))
    cfg = CONFIGS[name]
    dots = dot_eqns(jax.jit(lambda a, b: jq.dot_general(a, b, MM, config=cfg)), x, w)
    assert dots and all(jnp.issubdtype(d[0], jnp.floating) and d[1] == jnp.float32 for d in dots)


def test_asymmetric_operands_fall_back_to_float():
    """A zero point doesn't factor out of the contraction: the product must not run on codes."""
    cfg = jq.w8a8(symmetric=False)
    x, w = rand(0, (16, 128), 2.0, axis=0), rand(1, (128, 24), 2.0, axis=1)
    dots = dot_eqns(lambda a, b: jq.dot_general(a, b, MM, config=cfg), x, w)
    assert dots and all(d[0] == jnp.float32 for d in dots), dots
    a, y = analyze(cfg, x, w), qdot(cfg, x, w)
    assert_within(y, a.definition, a.tol, "asymmetric w8a8")
    assert_within(y, a.exact, a.bound, "asymmetric w8a8 vs float")


# --- serving: pre-quantized operands ----------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["w8a8", "wo_int4_g32", "wo_nf4_g64", "wo_int4_g32_asym", "fp8", "grouped_int8_x_int4"]
)
def test_serving_qarray_rhs_equals_float_rhs(name):
    cfg = CONFIGS[name]
    x, w = rand(0, (16, 128), 2.0, axis=0), rand(1, (128, 24), 2.0, axis=1)
    wq = jq.core.quantize_operand(w, cfg.rhs, (0,))
    if cfg.rhs.bits <= 4:
        assert wq.pack_axis is not None and wq.nbytes < w.size  # really packed
    assert_within(
        qdot(cfg, x, wq), qdot(cfg, x, w), analyze(cfg, x, w).tol, f"{name} served vs float"
    )


def test_serving_w8a8_stays_integer():
    x, w = rand(0, (16, 128), 2.0, axis=0), rand(1, (128, 24), 2.0, axis=1)
    cfg = jq.w8a8()
    wq = jq.core.quantize_operand(w, cfg.rhs, (0,))
    dots = dot_eqns(jax.jit(lambda a, b: jq.dot_general(a, b, MM, config=cfg)), x, wq)
    assert dots and all(d == (jnp.int8, jnp.int8, jnp.int32) for d in dots), dots


def test_qarray_lhs_with_static_per_tensor_scale():
    cfg = jq.w8a8()
    x, w = rand(0, (16, 128), 2.0, axis=0), rand(1, (128, 24), 2.0, axis=1)
    static = jnp.full((1, 1), 1.5 * float(jnp.max(jnp.abs(x))) / 127.0)  # a calibrated constant
    xq = jq.quantize(x, jq.QuantSpec(qtype="int8"), scale=static)
    y = qdot(cfg, xq, w)
    xhat, what = xq.dequantize(), analyze(cfg, x, w).what
    assert_within(y, dg(xhat, what, MM), reassoc_tol(xhat, what, MM), "static-scale lhs")
    # The static scale is used as is (not re-calibrated): the error is bounded by its step.
    dx = jnp.broadcast_to(static / 2, x.shape)
    dw = half_step(jq.core.quantize_operand(w, cfg.rhs, (0,)))
    assert_within(y, dg(x, w, MM), product_error_bound(x, dx, w, dw, MM), "static vs float")
    dots = dot_eqns(lambda a, b: jq.dot_general(a, b, MM, config=cfg), xq, w)
    assert dots and all(d == (jnp.int8, jnp.int8, jnp.int32) for d in dots), dots


@pytest.mark.parametrize("name", ["w8a8", "grouped_int8_x_int4"])
def test_qarray_on_both_sides(name):
    cfg = CONFIGS[name]
    x, w = rand(0, (16, 128), 2.0, axis=0), rand(1, (128, 24), 2.0, axis=1)
    xq = jq.core.quantize_operand(x, cfg.lhs, (1,))
    wq = jq.core.quantize_operand(w, cfg.rhs, (0,))
    a = analyze(cfg, x, w)
    assert_within(qdot(cfg, xq, wq), qdot(cfg, x, w), a.tol, "both QArrays")
    # config=None with QArrays: dequantize, then lax.dot_general.
    assert_within(qdot(None, xq, wq), a.definition, a.tol, "config=None QArrays")


# --- dimension numbers ------------------------------------------------------------------------

DN_CASES = {
    # name: (lhs shape, rhs shape, dimension numbers)
    "batched_bmk_bkn": ((3, 8, 64), (3, 64, 5), (((2,), (1,)), ((0,), (0,)))),
    "contract_not_last": ((64, 6), (64, 5), (((0,), (0,)), ((), ()))),
    "two_contracting": ((4, 8, 16), (16, 8, 5), (((1, 2), (1, 0)), ((), ()))),
    "free_both_sides": ((2, 3, 32), (32, 4, 5), (((2,), (0,)), ((), ()))),
    "batch_in_middle": ((6, 2, 32), (32, 2, 7), (((2,), (0,)), ((1,), (1,)))),
    "two_batch_two_free": ((2, 3, 4, 32), (3, 32, 5, 2), (((3,), (1,)), ((0, 1), (3, 0)))),
}


DN_PAIRS = [(case, "w8a8") for case in DN_CASES] + [
    ("batched_bmk_bkn", "wo_int8"),
    ("two_contracting", "wo_int8"),
    ("batch_in_middle", "fp8"),
    ("two_batch_two_free", "fp8"),
]


@pytest.mark.parametrize("case,cfg_name", DN_PAIRS)
def test_dimension_numbers(case, cfg_name):
    lshape, rshape, dn = DN_CASES[case]
    cfg = CONFIGS[cfg_name]
    x, w = rand(4, lshape, 1.0), rand(5, rshape, 1.0, axis=len(rshape) - 1)
    y = qdot(cfg, x, w, dn)
    lax_out = jax.eval_shape(lambda a, b: lax.dot_general(a, b, dn), x, w)
    assert y.shape == lax_out.shape and y.dtype == lax_out.dtype
    a = analyze(cfg, x, w, dn)
    assert_within(y, a.ref, a.tol, f"{case} vs reference")
    assert_within(a.ref, a.definition, a.tol, f"{case} reference vs definition")
    assert_within(y, a.exact, a.bound, f"{case} vs lax")


@pytest.mark.parametrize("case", ["contract_not_last", "two_batch_two_free"])
def test_dimension_numbers_grouped(case):
    lshape, rshape, dn = DN_CASES[case]
    x, w = rand(6, lshape, 1.0), rand(7, rshape, 1.0)
    y = qdot(GROUPED_8x4, x, w, dn)
    a = analyze(GROUPED_8x4, x, w, dn)
    assert_within(y, a.definition, a.tol, f"{case} grouped")
    assert_within(y, a.exact, a.bound, f"{case} grouped vs lax")


def test_bf16_operands_give_bf16():
    x, w = rand(0, (8, 64), dtype=jnp.bfloat16), rand(1, (64, 16), dtype=jnp.bfloat16)
    for cfg in (jq.w8a8(), jq.weight_only("int4", group_size=32)):
        y = qdot(cfg, x, w)
        assert y.dtype == jnp.bfloat16
        a = analyze(cfg, x, w)
        # bf16 rounding of the products / sums and of the output, on top of the steps.
        k, eps = x.shape[1], float(jnp.finfo(jnp.bfloat16).eps)
        bf16_slack = 2 * (k + 4) * eps * dg(jnp.abs(a.xhat), jnp.abs(a.what), MM)
        assert_within(y, a.exact, a.bound + bf16_slack, "bf16")


# --- transformations and Flax -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["w8a8", "wo_int4_g32", "fp8"])
def test_vmap_equals_loop(name):
    cfg = CONFIGS[name]
    xs, w = rand(0, (3, 16, 128), 2.0, axis=1), rand(1, (128, 24), 2.0, axis=1)
    batched = jax.jit(jax.vmap(lambda a: jq.dot_general(a, w, MM, config=cfg)))(xs)
    looped = jnp.stack([qdot(cfg, xs[i], w) for i in range(xs.shape[0])])
    tol = jnp.stack([analyze(cfg, xs[i], w).tol for i in range(xs.shape[0])])
    assert_within(batched, looped, tol, "vmap")


def test_flax_dense_hooks_agree():
    cfg = jq.w8a8()

    class Net(nn.Module):
        hook: str

        @nn.compact
        def __call__(self, x):
            if self.hook == "fn":
                dense = nn.Dense(16, dot_general=jq.make_dot_general(cfg), name="dense")
            else:
                hook = functools.partial(jq.make_dot_general, cfg)
                dense = nn.Dense(16, dot_general_cls=hook, name="dense")
            return nn.relu(dense(x))

    x = rand(0, (2, 5, 32))
    params = jax.jit(Net("fn").init)(jax.random.key(0), x)
    y_fn = jax.jit(Net("fn").apply)(params, x)
    y_cls = jax.jit(Net("cls").apply)(params, x)
    np.testing.assert_array_equal(y_fn, y_cls)
    kernel, bias = params["params"]["dense"]["kernel"], params["params"]["dense"]["bias"]
    dn = (((2,), (0,)), ((), ()))
    manual = nn.relu(qdot(cfg, x, kernel, dn) + bias)
    assert_within(y_fn, manual, analyze(cfg, x, kernel, dn).tol, "flax Dense")


# --- bad inputs -------------------------------------------------------------------------------


def test_config_rejects_spec_with_axes():
    with pytest.raises(ValueError, match="channel_axes"):
        jq.DotGeneralConfig(lhs=jq.QuantSpec(qtype="int8", channel_axes=(0,)))
    with pytest.raises(ValueError, match="channel_axes"):
        jq.DotGeneralConfig(rhs=jq.QuantSpec(qtype="int4", group_size=32, group_axis=0))
    with pytest.raises(ValueError, match="channel_axes"):
        jq.BackwardSpec(grad=jq.QuantSpec(qtype="int8", channel_axes=(1,)))
    with pytest.raises(ValueError):
        jq.DotGeneralConfig(dlhs=jq.QuantSpec(qtype="int8"))  # not a BackwardSpec
    with pytest.raises(ValueError):
        jq.DotGeneralConfig(lhs="int8")


def test_config_is_frozen_and_replaceable():
    cfg = jq.w8a8()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lhs = None
    cfg2 = dataclasses.replace(cfg, rhs=jq.QuantSpec(qtype="int4", group_size=32))
    assert cfg2.rhs.qtype == "int4" and cfg.rhs.qtype == "int8"


def test_group_size_with_two_contracting_axes_tiles_the_innermost():
    # more in tests/nn/test_any_model_groups.py
    x, w = rand(0, (4, 8, 32)), rand(1, (8, 32, 5))
    dn = (((1, 2), (0, 1)), ((), ()))
    cfg = jq.weight_only("int4", group_size=16)
    q = jq.core.quantize_operand(w, cfg.rhs, (0, 1))
    assert q.scale.shape == (8, 2, 5) and q.group_axis == 1
    y = jq.dot_general(x, w, dn, config=cfg)
    np.testing.assert_allclose(y, jax.lax.dot_general(x, q.dequantize(), dn), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divide"):
        jq.dot_general(x, w, dn, config=jq.weight_only("int4", group_size=24))


def test_group_size_not_dividing_k_raises():
    x, w = rand(0, (4, 96)), rand(1, (96, 5))
    with pytest.raises(ValueError, match="divide"):
        jq.dot_general(x, w, MM, config=jq.weight_only("int4", group_size=64))


def test_non_config_raises_type_error():
    with pytest.raises(TypeError, match="DotGeneralConfig"):
        jq.dot_general(rand(0, (2, 4)), rand(1, (4, 3)), MM, config=jq.QuantSpec(qtype="int8"))
