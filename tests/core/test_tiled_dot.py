"""The tiled weight-only product (few lhs rows x a QArray weight) and the single-row int8 dot.

Both are fast paths of ``jq.dot_general``: they must equal ``jq.dot_general_reference`` up to
float reassociation, ``|y - y_ref| <= 2 (K + 4) eps (|x| . |what|)``, and the tiled one must
never hold the whole weight in float.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.core import tiled_dot
from jaxquant.core.packing import unpack_plane
from tests.core.test_dot_general import all_eqns, assert_within, dot_eqns, rand, reassoc_tol

DENSE = (((1,), (0,)), ((), ()))  # x [M, K] . w [K, N]: the leading axis is contracted
HEAD = (((2,), (1,)), ((), ()))  # x [B, S, D] . E [V, D]: the leading axis is free
GENERAL = (((1,), (0,)), ((), ()))  # x [M, K] . w [K, H, hd]

CASES = {
    "dense": ((3, 256), (256, 96), DENSE),
    "head": ((2, 1, 128), (512, 128), HEAD),
    "kernel_3d": ((4, 256), (256, 4, 16), GENERAL),
}
CONFIGS = {
    "int8": jq.weight_only("int8"),
    "int4_g32": jq.weight_only("int4", group_size=32),
    "int4": jq.weight_only("int4"),
    "nf4_g64": jq.weight_only("nf4", group_size=64),
    "int4_g32_asym": jq.weight_only("int4", group_size=32, symmetric=False),
    "int2_g32": jq.weight_only("int2", group_size=32),
}


def _served(cfg, case):
    xs, ws, dn = CASES[case]
    x, w = rand(0, xs), rand(1, ws, 1.0, axis=len(ws) - 1)
    return x, jq.core.quantize_operand(w, cfg.rhs, dn[0][1]), dn


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiled_equals_reference(name, case):
    cfg = CONFIGS[name]
    x, wq, dn = _served(cfg, case)
    assert tiled_dot.tile_rows(wq) is not None  # the tiled path really runs
    y = jax.jit(lambda a, b: jq.dot_general(a, b, dn, config=cfg))(x, wq)
    ref = jq.dot_general_reference(x, wq, dn, config=cfg)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    tol = reassoc_tol(x, wq.dequantize(jnp.float32), dn)
    assert_within(y, ref, tol, f"{name} {case}: tiled vs reference")
    # Eager agrees too.
    assert_within(jq.dot_general(x, wq, dn, config=cfg), ref, tol, f"{name} {case} eager")


def _float_shapes(fn, *args):
    """Shapes of every float array any equation produces (sub-jaxprs included)."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return {
        tuple(v.aval.shape)
        for e in all_eqns(jaxpr)
        for v in e.outvars
        if jnp.issubdtype(v.aval.dtype, jnp.floating)
    }


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["int8", "int4_g32"])
def test_no_float_weight_of_full_size(name, case):
    """Served weight-only decode never materialises the weight in float; the reference does."""
    cfg = CONFIGS[name]
    x, wq, dn = _served(cfg, case)
    fast = _float_shapes(lambda a, b: jq.dot_general(a, b, dn, config=cfg), x, wq)
    ref = _float_shapes(lambda a, b: jq.dot_general_reference(a, b, dn, config=cfg), x, wq)
    assert wq.shape in ref  # the check can see a full-size float weight
    assert wq.shape not in fast
    assert max(int(np.prod(s)) for s in fast) <= max(
        tiled_dot.TILE_ELEMENTS, int(np.prod(wq.shape)) // 2
    )


def test_int4_tiles_use_code_planes_not_interleaved_codes():
    """Packed along the contraction, the int4 tile's codes are read as two planes of the bytes."""
    cfg = CONFIGS["int4_g32"]
    x, wq, dn = _served(cfg, "dense")
    assert wq.qvalue.dtype == jnp.uint8 and wq.qvalue.shape == (128, 96)
    c = tiled_dot.tile_rows(wq)
    dots = dot_eqns(lambda a, b: jq.dot_general(a, b, dn, config=cfg), x, wq)
    assert len(dots) == 2  # one per plane, inside the loop over tiles
    planes = [unpack_plane(wq.qvalue, 4, j, signed=True) for j in (0, 1)]
    np.testing.assert_array_equal(np.stack(planes, 1).reshape(wq.shape), wq.codes())
    assert c % 32 == 0 and 256 % c == 0


def test_many_rows_and_batch_axes_take_the_reference_path():
    cfg = CONFIGS["int8"]
    wq = jq.core.quantize_operand(rand(1, (256, 96)), cfg.rhs, (0,))
    x = rand(0, (tiled_dot.MAX_TILED_ROWS + 1, 256))
    assert tiled_dot.tiled_weight_dot(x, wq, DENSE, None, None, jnp.float32) is None
    x3 = rand(0, (2, 1, 256))
    wb = jq.core.quantize_operand(rand(1, (2, 256, 8)), cfg.rhs, (1,))
    dn = (((2,), (1,)), ((0,), (0,)))
    assert tiled_dot.tiled_weight_dot(x3, wb, dn, None, None, jnp.float32) is None


def test_tile_rows_respects_groups_and_bytes():
    w = rand(1, (576, 1536))
    q4 = jq.core.quantize_operand(w, jq.weight_only("int4", group_size=96).rhs, (0,))
    c = tiled_dot.tile_rows(q4, target=1536 * 40)
    assert c == 96  # the group is the unit, even above the target
    q8 = jq.core.quantize_operand(w, jq.weight_only("int8").rhs, (0,))
    assert tiled_dot.tile_rows(q8, target=1536 * 40) == 36  # largest divisor of 576 <= 40
    assert tiled_dot.tile_rows(q8, target=10**9) == 288  # at least two tiles


@pytest.mark.parametrize("shape", [(1, 128), (1, 1, 128)])
def test_single_row_int8_dot_is_padded_and_exact(shape):
    """One lhs row: the integer product runs on two rows (XLA:CPU's one-row int8 dot is slow)."""
    cfg = jq.w8a8()
    x = rand(0, shape)
    wq = jq.core.quantize_operand(rand(1, (512, 128)), cfg.rhs, (1,))
    dn = (((len(shape) - 1,), (1,)), ((), ()))
    y = jax.jit(lambda a, b: jq.dot_general(a, b, dn, config=cfg))(x, wq)
    ref = jq.dot_general_reference(x, wq, dn, config=cfg)
    xq = jq.core.quantize_operand(x, cfg.lhs, (len(shape) - 1,))
    assert_within(y, ref, reassoc_tol(xq.dequantize(), wq.dequantize(), dn), "single row w8a8")
    dots = dot_eqns(lambda a, b: jq.dot_general(a, b, dn, config=cfg), x, wq)
    assert dots == [(jnp.int8, jnp.int8, jnp.int32)]
