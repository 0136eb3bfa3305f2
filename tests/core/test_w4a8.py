"""The tiled W4A8 product (int8 activations of few rows x a packed sub-byte weight).

It must equal ``jq.dot_general_reference`` (dequantize both, float dot) up to float
reassociation, stay within half an activation step of the weight-only product, run its dots on
int8 operands with int32 accumulation, and never hold the whole weight unpacked.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
import jaxquant.core as jqc
from jaxquant.core import tiled_dot, w4a8
from jaxquant.core.dot_config import w4a8 as w4a8_config
from tests.core.test_dot_general import all_eqns, assert_within, dg, dot_eqns, rand, reassoc_tol

DENSE = (((1,), (0,)), ((), ()))  # x [M, K] . w [K, N]
HEAD = (((2,), (1,)), ((), ()))  # x [B, S, D] . E [V, D]

CASES = {
    "dense": ((3, 256), (256, 96), DENSE),
    "dense_one_row": ((1, 256), (256, 96), DENSE),
    "head": ((2, 1, 128), (512, 128), HEAD),
    "head_one_row": ((1, 1, 128), (512, 128), HEAD),
}
CONFIGS = {
    "int4_g32": w4a8_config("int4", 32),
    "int4_g64": w4a8_config("int4", 64),
    "int3_g32": w4a8_config("int3", 32),
    "int2_g32": w4a8_config("int2", 32),
    "int4_per_column": w4a8_config("int4", None),
}


def _served(cfg, case, seed=0):
    xs, ws, dn = CASES[case]
    x = rand(seed, xs, 1.0, axis=0)  # rows of different magnitudes: per-row scales matter
    w = rand(seed + 1, ws, 1.0, axis=len(ws) - 1)
    return x, jqc.quantize_operand(w, cfg.rhs, dn[0][1]), dn


def _act(x, cfg, dn):
    """The int8 activations the product sees, dequantized, and their step per row."""
    xq = jqc.quantize_operand(x, cfg.lhs, dn[0][0])
    return xq.dequantize(jnp.float32), xq.scale


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_equals_reference(name, case):
    cfg = CONFIGS[name]
    x, wq, dn = _served(cfg, case)
    assert w4a8.tiled_int_dot(
        jqc.quantize_operand(x, cfg.lhs, dn[0][0], pack=False), wq, dn, jnp.float32,
        max_rows=tiled_dot.MAX_TILED_ROWS, tile=tiled_dot.tile_rows(wq)) is not None
    ref = jq.dot_general_reference(x, wq, dn, config=cfg)
    xhat, _ = _act(x, cfg, dn)
    tol = reassoc_tol(xhat, wq.dequantize(jnp.float32), dn)
    y = jax.jit(lambda a, b: jq.dot_general(a, b, dn, config=cfg))(x, wq)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert_within(y, ref, tol, f"{name} {case}: jit")
    assert_within(jq.dot_general(x, wq, dn, config=cfg), ref, tol, f"{name} {case}: eager")


@pytest.mark.parametrize("case", ["dense", "head"])
def test_within_half_an_activation_step_of_weight_only(case):
    """Against float activations times the same weight: ``|dy| <= sx / 2 . sum_k |w_hat|``."""
    cfg = CONFIGS["int4_g32"]
    x, wq, dn = _served(cfg, case)
    y = jq.dot_general(x, wq, dn, config=cfg)
    wo = jq.dot_general_reference(x, wq, dn, config=dataclasses.replace(cfg, lhs=None))
    what = wq.dequantize(jnp.float32)
    _, sx = _act(x, cfg, dn)
    step = jnp.broadcast_to(sx, x.shape)  # a row's step on each of its elements
    tol = dg(step / 2, jnp.abs(what), dn) + reassoc_tol(jnp.abs(x) + step, what, dn)
    assert_within(y, wo, tol, f"{case}: W4A8 vs W4A16")
    # The bound is not vacuous: the activation error is visible at this size.
    assert float(jnp.max(jnp.abs(y - wo))) > 0


def test_within_the_quantization_error_of_the_float_product():
    """Against float ``x . w``: ``|dy| <= |x| . |dw| + |dx| . |w_hat|`` (both errors <= half a
    step: the weight's per group, the activation's per row)."""
    cfg = CONFIGS["int4_g32"]
    xs, ws, dn = CASES["dense"]
    x, w = rand(3, xs, 1.0, axis=0), rand(4, ws, 1.0, axis=1)
    wq = jqc.quantize_operand(w, cfg.rhs, (0,))
    what = wq.dequantize(jnp.float32)
    wstep = jnp.repeat(wq.scale, 32, axis=0)
    _, sx = _act(x, cfg, dn)
    tol = (dg(jnp.abs(x), wstep / 2, dn) + dg(jnp.broadcast_to(sx / 2, x.shape), jnp.abs(what), dn)
           + reassoc_tol(jnp.abs(x), jnp.abs(w) + wstep, dn))
    assert_within(jq.dot_general(x, wq, dn, config=cfg), x @ w, tol, "W4A8 vs float")


@pytest.mark.parametrize("case", ["dense", "head_one_row"])
def test_dots_are_int8_and_the_weight_stays_tiled(case):
    cfg = CONFIGS["int4_g32"]
    x, wq, dn = _served(cfg, case)
    fn = lambda a, b: jq.dot_general(a, b, dn, config=cfg)  # noqa: E731
    dots = dot_eqns(fn, x, wq)
    assert dots == [(jnp.int8, jnp.int8, jnp.int32)] * 2  # one per code plane, in the loop
    jaxpr = jax.make_jaxpr(fn)(x, wq)
    loops = [e for e in all_eqns(jaxpr) if e.primitive.name in ("scan", "while")]
    assert loops
    int8_sizes = [int(np.prod(v.aval.shape)) for e in all_eqns(jaxpr) for v in e.outvars
                  if v.aval.dtype == jnp.int8]
    assert max(int8_sizes) <= max(tiled_dot.TILE_ELEMENTS, int(np.prod(wq.shape)) // 2)
    assert wq.shape not in {tuple(v.aval.shape) for e in all_eqns(jaxpr) for v in e.outvars}


def test_tiling_never_takes_the_untiled_integer_product():
    cfg = dataclasses.replace(CONFIGS["int4_g32"], tiling="never")
    x, wq, dn = _served(cfg, "dense")
    jaxpr = jax.make_jaxpr(lambda a, b: jq.dot_general(a, b, dn, config=cfg))(x, wq)
    assert not [e for e in all_eqns(jaxpr) if e.primitive.name in ("scan", "while")]
    assert dot_eqns(lambda a, b: jq.dot_general(a, b, dn, config=cfg), x, wq) == [
        (jnp.int8, jnp.int8, jnp.int32)]
    tiled = jq.dot_general(x, wq, dn, config=CONFIGS["int4_g32"])
    xhat, _ = _act(x, cfg, dn)
    assert_within(jq.dot_general(x, wq, dn, config=cfg), tiled,
                  2 * reassoc_tol(xhat, wq.dequantize(jnp.float32), dn), "never vs auto")


def test_paths_it_declines():
    cfg = CONFIGS["int4_g32"]
    wq = jqc.quantize_operand(rand(1, (256, 96)), cfg.rhs, (0,))
    t = tiled_dot.tile_rows(wq)

    def lhs(rows):
        return jqc.quantize_operand(rand(0, (rows, 256)), cfg.lhs, (1,), pack=False)

    kw = dict(max_rows=tiled_dot.MAX_TILED_ROWS, tile=t)
    assert w4a8.tiled_int_dot(lhs(tiled_dot.MAX_TILED_ROWS + 1), wq, DENSE, jnp.float32, **kw) is None
    assert w4a8.tiled_int_dot(lhs(2), wq, DENSE, jnp.float32, max_rows=16, tile=None) is None
    asym = jqc.quantize_operand(rand(1, (256, 96)), dataclasses.replace(cfg.rhs, symmetric=False),
                                (0,))
    assert w4a8.tiled_int_dot(lhs(2), asym, DENSE, jnp.float32, **kw) is None
    w8 = jqc.quantize_operand(rand(1, (256, 96)), jq.w8a8().rhs, (0,))  # W8A8 keeps its path
    assert w4a8.tiled_int_dot(lhs(2), w8, DENSE, jnp.float32, **kw) is None


def test_tiling_is_validated():
    with pytest.raises(ValueError, match="tiling must be one of"):
        dataclasses.replace(CONFIGS["int4_g32"], tiling="cpu")


def test_straight_through_gradient_matches_the_reference():
    cfg = CONFIGS["int4_g32"]
    x, wq, dn = _served(cfg, "dense")
    g = jax.grad(lambda a: jnp.sum(jq.dot_general(a, wq, dn, config=cfg) ** 2))(x)
    g_ref = jax.grad(lambda a: jnp.sum(jq.dot_general(
        a, wq, dn, config=dataclasses.replace(cfg, tiling="never")) ** 2))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-4,
                               atol=1e-4 * float(jnp.max(jnp.abs(g_ref))))
