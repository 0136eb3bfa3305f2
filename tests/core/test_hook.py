"""The Flax hook ``make_dot_general``: linen and NNX, keyword handling, ``out_sharding``."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from tests.core.test_dot_general import MM, analyze, assert_within, qdot, rand


def test_hook_is_a_value():
    """Equal configs give equal, hashable hooks (modules holding them share jit caches)."""
    a, b = jq.make_dot_general(jq.w8a8()), jq.make_dot_general(jq.w8a8())
    assert a == b and hash(a) == hash(b)
    assert a != jq.make_dot_general(jq.fp8())
    with pytest.raises(TypeError, match="DotGeneralConfig"):
        jq.make_dot_general("w8a8")


def test_unknown_keywords_are_rejected_not_dropped():
    x, w = rand(0, (4, 32)), rand(1, (32, 8))
    hook = jq.make_dot_general(jq.w8a8())
    with pytest.raises(TypeError, match="bogus"):
        hook(x, w, MM, bogus=1)


def test_nnx_linear_runs_the_quantized_product():
    """NNX passes ``out_sharding=`` to the hook; the result is the quantized product."""
    cfg = jq.w8a8()
    layer = nnx.Linear(
        32, 16, use_bias=False, dot_general=jq.make_dot_general(cfg), rngs=nnx.Rngs(0)
    )
    x = rand(0, (5, 32))
    y = layer(x)
    kernel = layer.kernel[...]
    assert_within(y, qdot(cfg, x, kernel), analyze(cfg, x, kernel).tol, "nnx Linear")


@pytest.mark.parametrize(
    "cfg", [jq.w8a8(), jq.weight_only("int4", group_size=32)], ids=["w8a8", "wo_int4_g32"]
)
def test_out_sharding_is_honoured(cfg):
    """Auto mesh axes: the quantized output gets a sharding constraint. (With config=None the
    call is exactly ``lax.dot_general``, which takes only explicit axes: next test.)"""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    out = NamedSharding(mesh, P("data", "model"))
    x, w = rand(0, (16, 64)), rand(1, (64, 24))
    hook = jq.make_dot_general(cfg)
    y = jax.jit(lambda a, b: hook(a, b, MM, out_sharding=out))(x, w)
    assert y.sharding.is_equivalent_to(out, y.ndim)
    ref = jq.dot_general(x, w, MM, config=cfg)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
    ye = jax.jit(lambda a, b: jq.einsum("md,dn->mn", a, b, config=cfg, out_sharding=out))(x, w)
    assert ye.sharding.is_equivalent_to(out, ye.ndim)
    np.testing.assert_array_equal(np.asarray(ye), np.asarray(ref))


@pytest.mark.parametrize("cfg", [None, jq.w8a8()], ids=["float", "w8a8"])
def test_out_sharding_under_explicit_axes(cfg):
    """Explicit mesh axes: lax.dot_general gets ``out_sharding`` (config None), or the quantized
    output is resharded (``jax.sharding.reshard``)."""
    axis_type = jax.sharding.AxisType.Explicit
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))
    x, w = rand(0, (16, 64)), rand(1, (64, 24))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, P("data", None))
        ws = jax.device_put(w, P(None, None))
        y = jax.jit(
            lambda a, b: jq.dot_general(a, b, MM, config=cfg, out_sharding=P(None, "model"))
        )(xs, ws)
    assert y.sharding.spec == P(None, "model")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jq.dot_general(x, w, MM, config=cfg)))
