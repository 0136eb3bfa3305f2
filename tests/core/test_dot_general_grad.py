"""Gradients of the quantized ``dot_general``.

* float backward (``dlhs = drhs = None``): the straight-through estimator, i.e. exactly the
  gradients of the float product of the *dequantized* operands;
* quantized backward: each backward product ``dlhs = g . rhat``, ``drhs = lhat . g`` is itself
  a quantized dot, so its error is bounded by the steps of ``g`` and of the saved operand, with
  the scale layout that the backward dimension numbers imply;
* stochastic rounding of ``g``: unbiased, so the mean over seeds converges at the CLT rate.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import jaxquant as jq
from tests.core.test_dot_general import (
    DN_CASES,
    MM,
    assert_within,
    dequantized_operands,
    dg,
    product_error_bound,
    rand,
)


@functools.partial(jax.jit, static_argnums=(0, 4))
def vjp_of(cfg, x, w, g, dn=MM):
    """``(d lhs, d rhs)`` of ``jq.dot_general`` for the output cotangent ``g``."""
    _, pull = jax.vjp(lambda a, b: jq.dot_general(a, b, dn, config=cfg), x, w)
    return pull(g)


def ste_grads(xhat, what, g, dn):
    """Gradients of the float product of fixed (dequantized) operands."""
    _, pull = jax.vjp(
        lambda a, b: lax.dot_general(a, b, dn, precision=lax.Precision.HIGHEST), xhat, what
    )
    return pull(g)


def _out_shape(x, w, dn):
    return jax.eval_shape(lambda a, b: lax.dot_general(a, b, dn), x, w).shape


# --- float backward: straight-through ---------------------------------------------------------

STE_CASES = [
    ("w8a8", MM),
    ("wo_int8", MM),
    ("wo_int4_g32", MM),
    ("w8a8", DN_CASES["batched_bmk_bkn"][2]),
    ("w8a8", DN_CASES["two_batch_two_free"][2]),
    ("w8a8", DN_CASES["two_contracting"][2]),
]
_CFGS = {
    "w8a8": jq.w8a8(),
    "wo_int8": jq.weight_only("int8"),
    "wo_int4_g32": jq.weight_only("int4", group_size=32),
}


def grad_tol(xhat, what, g, dn):
    """Reassociation bounds for both gradients: ``2 (n + 4) eps`` times the gradients of the
    absolute product at ``|xhat|, |what|, |g|`` (which are the sums of absolute terms), with
    ``n = g.size`` >= the number of terms in any gradient element."""
    eps = float(jnp.finfo(jnp.float32).eps)
    ax, aw = ste_grads(jnp.abs(xhat), jnp.abs(what), jnp.abs(g), dn)
    c = 2 * (g.size + 4) * eps
    return c * ax + 1e-30, c * aw + 1e-30


@pytest.mark.parametrize(
    "name,dn", STE_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(STE_CASES)]
)
def test_float_backward_is_straight_through(name, dn):
    cfg = _CFGS[name]
    if dn == MM:
        x, w = rand(0, (8, 64), 1.0), rand(1, (64, 16), 1.0, axis=1)
    else:
        case = next(c for c in DN_CASES.values() if c[2] == dn)
        x, w = rand(0, case[0], 1.0), rand(1, case[1], 1.0)
    g = rand(2, _out_shape(x, w, dn))
    dx, dw = vjp_of(cfg, x, w, g, dn)
    xhat, _, what, _ = dequantized_operands(cfg, x, w, dn)
    ex, ew = ste_grads(xhat, what, g, dn)
    tx, tw = grad_tol(xhat, what, g, dn)
    assert dx.shape == x.shape and dw.shape == w.shape
    assert_within(dx, ex, tx, f"{name} d lhs")
    assert_within(dw, ew, tw, f"{name} d rhs")
    # Not the gradient of the float product: d lhs = g . what really uses the dequantized rhs.
    fx, _ = ste_grads(x, w, g, dn)
    assert float(jnp.max(jnp.abs(fx - ex))) > float(jnp.max(tx))


def test_check_grads_weight_only_fixed_qarray_rhs():
    """With a pre-quantized rhs the product is linear in lhs: numerical = reverse-mode grads."""
    cfg = jq.weight_only("int4", group_size=32)
    w = rand(1, (64, 16))
    wq = jq.core.quantize_operand(w, cfg.rhs, (0,))
    f = jax.jit(lambda a: jq.dot_general(a, wq, MM, config=cfg))
    check_grads(f, (rand(0, (4, 64)),), order=1, modes=["rev"])


@pytest.mark.parametrize("case", ["batched_bmk_bkn", "two_batch_two_free", "contract_not_last"])
def test_check_grads_unquantized_config(case):
    """A config quantizing nothing still goes through the custom VJP: its transposes of the
    dimension numbers must give the true gradients."""
    lshape, rshape, dn = DN_CASES[case]
    f = jax.jit(lambda a, b: jq.dot_general(a, b, dn, config=jq.DotGeneralConfig()))
    check_grads(f, (rand(0, lshape), rand(1, rshape)), order=1, modes=["rev"])


def test_grads_flow_to_lhs_only_with_qarray_rhs():
    cfg = jq.w8a8()
    x, w = rand(0, (8, 64)), rand(1, (64, 16))
    wq = jq.core.quantize_operand(w, cfg.rhs, (0,))
    g = rand(2, (8, 16))
    dx, dwq = vjp_of(cfg, x, wq, g)
    xhat, _, what, _ = dequantized_operands(cfg, x, w, MM)
    ex, _ = ste_grads(xhat, what, g, MM)
    assert_within(dx, ex, grad_tol(xhat, what, g, MM)[0], "d lhs")
    assert float(jnp.max(jnp.abs(dwq.scale))) == 0.0  # serving weights get no gradient


# --- quantized backward -----------------------------------------------------------------------


def _bwd_bound(cfg, x, w, g, stochastic: bool):
    """Elementwise bounds on ``|dl - g . rhat^T|`` and ``|dr - lhat^T . g|`` for 2-D operands.

    In ``dlhs = dot(g [M, N], rhat [K, N])`` (contracting N) ``g`` has a scale per row m and
    ``rhat`` one per row k; in ``drhs = dot(g, lhat [M, K])`` (contracting M) ``g`` has one
    per column n and ``lhat`` one per column k. Stochastic rounding errs by < 1 step, nearest
    by <= 1/2.
    """
    xhat, _, what, _ = dequantized_operands(cfg, x, w, MM)
    qmax = jq.get_qtype(cfg.dlhs.grad.qtype).max_value
    gfrac = 1.0 if stochastic else 0.5
    ag = jnp.abs(g)
    dg_rows = gfrac * jnp.broadcast_to(jnp.max(ag, axis=1, keepdims=True) / qmax, g.shape)
    dg_cols = gfrac * jnp.broadcast_to(jnp.max(ag, axis=0, keepdims=True) / qmax, g.shape)
    dw_rows = 0.5 * jnp.broadcast_to(jnp.max(jnp.abs(what), 1, keepdims=True) / qmax, w.shape)
    dx_cols = 0.5 * jnp.broadcast_to(jnp.max(jnp.abs(xhat), 0, keepdims=True) / qmax, x.shape)
    nt = (((1,), (1,)), ((), ()))  # g [M, N] . rhat [K, N]
    tn = (((0,), (0,)), ((), ()))  # lhat [M, K] . g [M, N]
    bl = product_error_bound(g, dg_rows, what, dw_rows, nt)
    br = product_error_bound(xhat, dx_cols, g, dg_cols, tn)
    return (dg(g, what, nt), bl), (dg(xhat, g, tn), br)


@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])
def test_fully_quantized_grads_within_step_bound(stochastic):
    cfg = jq.fully_quantized(stochastic_grad=stochastic)
    x, w = rand(0, (16, 64), 1.0), rand(1, (64, 24), 1.0, axis=1)
    g = rand(2, (16, 24), 1.0)
    dx, dw = vjp_of(cfg, x, w, g)
    (ex, bx), (ew, bw) = _bwd_bound(cfg, x, w, g, stochastic)
    assert_within(dx, ex, bx, "fully_quantized d lhs")
    assert_within(dw, ew, bw, "fully_quantized d rhs")
    assert float(jnp.max(jnp.abs(dx - ex))) > 0  # the backward really was quantized


def test_fully_quantized_backward_runs_on_int8():
    from tests.core.test_dot_general import dot_eqns

    cfg = jq.fully_quantized()
    x, w = rand(0, (8, 32)), rand(1, (32, 16))
    grad = jax.grad(lambda a, b: jnp.sum(jq.dot_general(a, b, MM, config=cfg) ** 2), (0, 1))
    dots = dot_eqns(grad, x, w)
    assert len(dots) == 3, dots  # forward, d lhs, d rhs
    assert all(d == (jnp.int8, jnp.int8, jnp.int32) for d in dots), dots


def test_fp8_grads_within_step_bound():
    """e5m2 gradients times e4m3 operands: relative half-ulp errors plus subnormal steps."""
    cfg = jq.fp8()
    x, w = rand(0, (16, 64)), rand(1, (64, 24))
    g = rand(2, (16, 24))
    dx, dw = vjp_of(cfg, x, w, g)
    xhat, _, what, _ = dequantized_operands(cfg, x, w, MM)

    def fp8_err(v, dtype, keep_axis):  # the scale maps max|v| per kept index onto the max
        fi = jnp.finfo(dtype)
        s = jnp.max(jnp.abs(v), axis=1 - keep_axis, keepdims=True) / float(fi.max)
        return 2.0 ** -(fi.nmant + 1) * jnp.abs(v) + s * float(fi.smallest_subnormal) / 2

    nt, tn = (((1,), (1,)), ((), ())), (((0,), (0,)), ((), ()))
    bl = product_error_bound(
        g, fp8_err(g, jnp.float8_e5m2, 0), what, fp8_err(what, jnp.float8_e4m3fn, 0), nt
    )
    br = product_error_bound(
        xhat, fp8_err(xhat, jnp.float8_e4m3fn, 1), g, fp8_err(g, jnp.float8_e5m2, 1), tn
    )
    assert_within(dx, dg(g, what, nt), bl, "fp8 d lhs")
    assert_within(dw, dg(xhat, g, tn), br, "fp8 d rhs")


# --- stochastic rounding ----------------------------------------------------------------------

SR_GRAD = jq.BackwardSpec(grad=jq.QuantSpec(qtype="int8", rounding="stochastic"))
SR_CFG = jq.DotGeneralConfig(
    lhs=jq.QuantSpec(qtype="int8"), rhs=jq.QuantSpec(qtype="int8"), dlhs=SR_GRAD, drhs=SR_GRAD
)


def test_stochastic_gradient_is_unbiased():
    """Only ``g`` is quantized (stochastically) in the backward, so E[d lhs] = g . rhat^T.

    Per element the rounding error of ``g`` has variance <= step^2 / 4, so the mean over S
    seeds of ``d lhs[m, k]`` has std <= sqrt(sum_n (step_m rhat[k, n])^2 / 4 / S). A 6-sigma
    band holds; round-to-nearest (biased) leaves an error that doesn't average out and fails.
    """
    x, w = rand(0, (8, 64), 1.0), rand(1, (64, 16), 1.0, axis=1)
    g = rand(2, (8, 16), 1.0)
    n_seeds = 32
    # Eager: the seed is static config, so a jitted grad would recompile for every seed.
    dxs = jnp.stack(
        [
            jax.vjp(lambda a, b, c=c: jq.dot_general(a, b, MM, config=c), x, w)[1](g)[0]
            for c in (dataclasses.replace(SR_CFG, seed=s) for s in range(n_seeds))
        ]
    )
    xhat, _, what, _ = dequantized_operands(SR_CFG, x, w, MM)
    exact, _ = ste_grads(xhat, what, g, MM)
    step = jnp.max(jnp.abs(g), axis=1, keepdims=True) / 127.0  # [M, 1]: g's scale per row
    sigma = jnp.sqrt(step**2 / 4 * jnp.sum(what**2, axis=1)[None, :] / n_seeds)  # [M, K]
    mean = jnp.mean(dxs, axis=0)
    slack = grad_tol(xhat, what, g, MM)[0]
    assert_within(mean, exact, 6 * sigma + slack, "mean of stochastic d lhs")
    # The draws really differ, and averaging really helps: the mean beats a single draw.
    single = jnp.abs(dxs[0] - exact)
    assert float(jnp.max(jnp.std(dxs, axis=0))) > 0
    assert float(jnp.mean(jnp.abs(mean - exact))) < 0.5 * float(jnp.mean(single))

    nearest = dataclasses.replace(SR_CFG, dlhs=jq.BackwardSpec(grad=jq.QuantSpec(qtype="int8")))
    biased = vjp_of(nearest, x, w, g)[0]
    assert (jnp.abs(biased - exact) > 6 * sigma + slack).any(), "test can't see a bias"


def test_stochastic_gradient_deterministic_for_fixed_seed():
    x, w, g = rand(0, (8, 64), 1.0), rand(1, (64, 16), 1.0, axis=1), rand(2, (8, 16), 1.0)
    a = vjp_of(SR_CFG, x, w, g)
    b = vjp_of(SR_CFG, x, w, g)
    c = vjp_of(dataclasses.replace(SR_CFG, seed=1), x, w, g)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert any(not np.array_equal(u, v) for u, v in zip(a, c, strict=True))
    # Eager and jitted agree for the same seed.
    _, pull = jax.vjp(lambda p, q: jq.dot_general(p, q, MM, config=SR_CFG), x, w)
    xhat, _, what, _ = dequantized_operands(SR_CFG, x, w, MM)
    for u, v, t in zip(pull(g), a, grad_tol(xhat, what, g, MM), strict=True):
        assert_within(u, v, 2 * t, "eager vs jit stochastic grads")


def test_jit_grad_equals_eager_grad():
    cfg = jq.w8a8()
    x, w = rand(0, (8, 32)), rand(1, (32, 16))
    loss = lambda a, b: jnp.sum(jnp.tanh(jq.dot_general(a, b, MM, config=cfg)))
    eager = jax.grad(loss, (0, 1))(x, w)
    jitted = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    xhat, _, what, _ = dequantized_operands(cfg, x, w, MM)
    tols = grad_tol(xhat, what, jnp.ones((8, 16)), MM)  # |tanh'| <= 1
    for u, v, t in zip(eager, jitted, tols, strict=True):
        assert_within(u, v, 2 * t, "eager vs jit grads")
