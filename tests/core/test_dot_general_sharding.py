"""Sharded quantized ``dot_general`` on the 8 fake CPU devices of ``tests/conftest.py``.

Activations sharded on their rows (data parallel), weights on their output columns (tensor
parallel): the per-row / per-column scales reduce only over the unsharded contracting axis, so
the quantized product needs no all-gather of the weight, and the result keeps the sharding.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from tests.core.test_dot_general import MM, assert_within, dequantized_operands, rand, reassoc_tol
from tests.core.test_dot_general_grad import grad_tol

M, K, N = 16, 96, 40  # K != N so the weight's shape is told apart from everything else

CONFIGS = {
    "w8a8": jq.w8a8(),
    "wo_int4_g32": jq.weight_only("int4", group_size=32),
    "fp8": jq.fp8(),
}


def _mesh(shape):
    devices = np.array(jax.devices()[:8]).reshape(shape)
    return Mesh(devices, ("data", "model") if len(shape) == 2 else ("model",))


def _layouts(mesh):
    """``(x sharding, w sharding)``: rows of x on 'data' (if any), columns of w on 'model'."""
    xs = P("data", None) if "data" in mesh.axis_names else P(None, None)
    return NamedSharding(mesh, xs), NamedSharding(mesh, P(None, "model"))


_GATHER = re.compile(r"=\s*(.*?)\s+all-gather(?:-start)?\(")


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of every all-gather (sync, or the tuple of an async start) in HLO text."""
    shapes = []
    for m in _GATHER.finditer(hlo):
        for dims in re.findall(r"\w+\[([0-9,]*)\]", m.group(1)):
            shapes.append(tuple(int(d) for d in dims.split(",") if d))
    return shapes


def test_all_gather_parser_sees_a_gather():
    """The HLO check below is only meaningful if it would see a weight all-gather: force one
    (replicated output of a column-sharded weight) and find it."""
    mesh = _mesh((2, 4))
    _, ws = _layouts(mesh)
    w = jax.device_put(rand(1, (K, N)), ws)
    f = jax.jit(lambda b: b * 2.0, out_shardings=NamedSharding(mesh, P()))
    assert (K, N) in _all_gather_shapes(f.lower(w).compile().as_text())


@pytest.mark.parametrize("mesh_shape", [(2, 4), (8,)], ids=["2x4", "8"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_matches_unsharded_without_weight_gather(name, mesh_shape):
    cfg = CONFIGS[name]
    mesh = _mesh(mesh_shape)
    xs, ws = _layouts(mesh)
    x, w = rand(0, (M, K), 1.0), rand(1, (K, N), 1.0, axis=1)
    f = jax.jit(lambda a, b: jq.dot_general(a, b, MM, config=cfg))
    expected = f(x, w)
    xd, wd = jax.device_put(x, xs), jax.device_put(w, ws)
    y = f(xd, wd)
    xhat, _, what, _ = dequantized_operands(cfg, x, w, MM)
    assert_within(y, expected, reassoc_tol(xhat, what, MM), f"{name} sharded")
    assert not y.sharding.is_fully_replicated
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(xs.spec[0], "model")), 2)
    gathered = _all_gather_shapes(f.lower(xd, wd).compile().as_text())
    assert (K, N) not in gathered, gathered  # no gather of the full weight (any dtype)


def test_sharded_serving_qarray_weight():
    """Packed int4 codes and group scales sharded like the weight's columns."""
    cfg = CONFIGS["wo_int4_g32"]
    mesh = _mesh((2, 4))
    xs, ws = _layouts(mesh)
    x, w = rand(0, (M, K)), rand(1, (K, N))
    wq = jq.core.quantize_operand(w, cfg.rhs, (0,))
    wqd = jax.device_put(wq, jax.tree.map(lambda _: ws, wq))
    f = jax.jit(lambda a, b: jq.dot_general(a, b, MM, config=cfg))
    y = f(jax.device_put(x, xs), wqd)
    xhat, _, what, _ = dequantized_operands(cfg, x, w, MM)
    assert_within(y, f(x, wq), reassoc_tol(xhat, what, MM), "sharded served")
    assert not y.sharding.is_fully_replicated
    hlo = f.lower(jax.device_put(x, xs), wqd).compile().as_text()
    gathered = _all_gather_shapes(hlo)
    assert (K, N) not in gathered and wq.qvalue.shape not in gathered, gathered


@pytest.mark.parametrize("name", ["w8a8", "wo_int4_g32"])
def test_scales_follow_shardings(name):
    cfg = CONFIGS[name]
    mesh = _mesh((2, 4))
    xs, ws = _layouts(mesh)
    xd, wd = jax.device_put(rand(0, (M, K)), xs), jax.device_put(rand(1, (K, N)), ws)
    qw = jax.jit(lambda b: jq.core.quantize_operand(b, cfg.rhs, (0,)))(wd)
    assert qw.scale.sharding.is_equivalent_to(ws, 2), qw.scale.sharding
    assert qw.qvalue.sharding.is_equivalent_to(ws, 2), qw.qvalue.sharding
    if cfg.lhs is not None:
        qx = jax.jit(lambda a: jq.core.quantize_operand(a, cfg.lhs, (1,)))(xd)
        assert qx.scale.sharding.is_equivalent_to(xs, 2), qx.scale.sharding


def test_sharded_grads_keep_weight_sharding():
    cfg = jq.w8a8()
    mesh = _mesh((2, 4))
    xs, ws = _layouts(mesh)
    x, w, c = rand(0, (M, K)), rand(1, (K, N)), rand(2, (M, N))
    loss = lambda a, b: jnp.sum(jq.dot_general(a, b, MM, config=cfg) * c)  # d loss / d y = c
    grad = jax.grad(loss, argnums=(0, 1))
    # XLA replicates the grads of a replicated ``c`` unless told (plain lax does the same), so
    # ask for the parameters' shardings and check they cost no gather of the weight.
    sharded = jax.jit(grad, out_shardings=(xs, ws))
    xd, wd = jax.device_put(x, xs), jax.device_put(w, ws)
    gx, gw = sharded(xd, wd)
    ex, ew = jax.jit(grad)(x, w)
    assert gw.sharding.is_equivalent_to(ws, 2) and gx.sharding.is_equivalent_to(xs, 2)
    gathered = _all_gather_shapes(sharded.lower(xd, wd).compile().as_text())
    assert (K, N) not in gathered, gathered
    xhat, _, what, _ = dequantized_operands(cfg, x, w, MM)
    tx, tw = grad_tol(xhat, what, c, MM)
    assert_within(gx, ex, 2 * tx, "sharded d lhs")
    assert_within(gw, ew, 2 * tw, "sharded d rhs")
