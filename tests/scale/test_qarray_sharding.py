"""QArray shardings on the 8 fake CPU devices: codes, scales and zero points split alike, packed
codes only in whole bytes, grouped axes only in whole groups, and quantized ``dot_general``
under ``jit`` with sharded operands and inside ``shard_map`` equal to the one-device result."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from jaxquant.core.sharding import ShardingError, local_qarray, qarray_partition_specs
from jaxquant.nn.mesh import make_mesh
from tests.core.test_dot_general import MM, assert_within, dequantized_operands, rand, reassoc_tol

SPEC = {"fsdp": 2, "tensor": 4}


def _q(shape, qtype="int4", group_size=None, symmetric=True, seed=0):
    spec = jq.QuantSpec(qtype=qtype, channel_axes=(1,), group_size=group_size,
                        group_axis=0 if group_size else None, symmetric=symmetric)
    return jq.quantize(rand(seed, shape, 1.0, axis=1), spec)


def test_codes_scales_and_zero_points_follow_the_logical_spec():
    q = _q((128, 64), "int4", group_size=32, symmetric=False)  # packed + grouped along axis 0
    s = qarray_partition_specs(q, P("fsdp", "tensor"), SPEC)
    assert s.qvalue == P("fsdp", "tensor")
    assert s.scale == s.zero_point == P("fsdp", "tensor")  # 4 groups over 2 shards
    per_channel = _q((128, 64), "int8")  # scale [1, 64]: its shared axis is replicated
    s = qarray_partition_specs(per_channel, P("fsdp", "tensor"), SPEC)
    assert s.qvalue == P("fsdp", "tensor") and s.scale == P(None, "tensor")
    assert s.zero_point is None


@pytest.mark.parametrize(
    ("shape", "qtype", "group", "mesh_shape", "why"),
    [
        ((12, 8), "int4", None, {"fsdp": 4}, "not whole bytes"),  # 3 codes a shard, 2 per byte
        ((16, 8), "int2", None, {"fsdp": 8}, "not whole bytes"),  # 2 codes a shard, 4 per byte
        ((64, 8), "int4", 32, {"fsdp": 4}, "would cut a group"),  # 2 groups over 4 shards
        ((24, 8), "int8", None, {"fsdp": 16}, "not a multiple"),
    ],
)
def test_a_split_inside_a_byte_or_group_is_refused(shape, qtype, group, mesh_shape, why):
    q = _q(shape, qtype, group)
    with pytest.raises(ShardingError, match=why):
        qarray_partition_specs(q, P("fsdp"), mesh_shape, what="w")
    relaxed = qarray_partition_specs(q, P("fsdp"), mesh_shape, strict=False)
    assert relaxed.qvalue == relaxed.scale == P(None, None)  # replicated alike


def _put(q, mesh, spec):
    specs = qarray_partition_specs(q, spec, mesh.shape)
    return jax.device_put(q, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                          is_leaf=lambda x: isinstance(x, P)))


@pytest.mark.parametrize("qtype", ["int4", "int2"])
def test_each_shard_is_the_quantized_block(qtype):
    """A device's codes and scales are exactly those of quantizing its block of the tensor:
    shards hold whole bytes and whole groups."""
    mesh = make_mesh("fsdp=2,tensor=4")
    x = rand(3, (256, 32), 1.0, axis=1)
    spec = jq.QuantSpec(qtype=qtype, channel_axes=(1,), group_size=64, group_axis=0)
    q = jq.quantize(x, spec)
    qd = _put(q, mesh, P("fsdp", "tensor"))
    for code_shard, scale_shard in zip(qd.qvalue.addressable_shards,
                                       qd.scale.addressable_shards, strict=True):
        rows, cols = scale_shard.index[0], code_shard.index[1]
        rows = slice(rows.start * 64, rows.stop * 64)
        block = jq.quantize(x[rows, cols], spec)
        np.testing.assert_array_equal(np.asarray(code_shard.data), np.asarray(block.qvalue))
        np.testing.assert_array_equal(np.asarray(scale_shard.data), np.asarray(block.scale))
    np.testing.assert_array_equal(jax.jit(jq.dequantize)(qd), jq.dequantize(q))


M, K, N = 16, 128, 48

CONFIGS = {"w8a8": jq.w8a8(), "wo_int4_g32": jq.weight_only("int4", group_size=32)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jit_with_fsdp_and_tensor_sharded_qarray_weight(name):
    cfg = CONFIGS[name]
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    x, w = rand(0, (M, K), 1.0), rand(1, (K, N), 1.0, axis=1)
    wq = jq.core.quantize_operand(w, cfg.rhs, (0,))
    f = jax.jit(lambda a, b: jq.dot_general(a, b, MM, config=cfg))
    xd = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None)))
    y = f(xd, _put(wq, mesh, P("fsdp", "tensor")))
    xhat, _, what, _ = dequantized_operands(cfg, x, w, MM)
    assert_within(y, f(x, wq), reassoc_tol(xhat, what, MM), f"{name} sharded")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shard_map_column_parallel(name):
    """Rows of x over data, columns of the weight over tensor: each device's product is a
    block of the whole one (no collective), equal to the one-device result."""
    cfg = CONFIGS[name]
    mesh = make_mesh("data=2,tensor=4")
    x, w = rand(0, (M, K), 1.0), rand(1, (K, N), 1.0, axis=1)
    wq = jq.core.quantize_operand(w, cfg.rhs, (0,))
    wspec = qarray_partition_specs(wq, P(None, "tensor"), mesh.shape)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data", None), wspec),
                       out_specs=P("data", "tensor"))
    def sharded(a, b):
        return jq.dot_general(a, local_qarray(b), MM, config=cfg)

    y = sharded(x, wq)
    xhat, _, what, _ = dequantized_operands(cfg, x, w, MM)
    assert_within(y, jq.dot_general(x, wq, MM, config=cfg), reassoc_tol(xhat, what, MM),
                  f"{name} shard_map")


def test_shard_map_row_parallel_whole_groups():
    """The contracting axis split over tensor in whole int4 groups: local products summed with
    ``psum`` equal the one-device product (only the summation order differs)."""
    cfg = CONFIGS["wo_int4_g32"]
    mesh = make_mesh("tensor=4,fsdp=2")
    x, w = rand(0, (M, K), 1.0), rand(1, (K, N), 1.0, axis=1)
    wq = jq.core.quantize_operand(w, cfg.rhs, (0,))
    wspec = qarray_partition_specs(wq, P("tensor", None), mesh.shape)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(None, "tensor"), wspec),
                       out_specs=P())
    def sharded(a, b):
        return jax.lax.psum(jq.dot_general(a, local_qarray(b), MM, config=cfg), "tensor")

    y = sharded(x, wq)
    xhat, _, what, _ = dequantized_operands(cfg, x, w, MM)
    assert_within(y, jq.dot_general(x, wq, MM, config=cfg), reassoc_tol(xhat, what, MM),
                  "row-parallel shard_map")


def test_local_qarray_refuses_a_cut_group():
    q = _q((64, 8), "int8", group_size=32)
    cut = jax.tree.map(lambda a: a[:16], q)  # 16 rows but still one whole group's scale
    with pytest.raises(ShardingError, match="inside a group"):
        local_qarray(cut)
    assert local_qarray(q) is q
