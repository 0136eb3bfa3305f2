"""Mesh specs, logical axes and param shardings of the tiny Transformer (float and serving)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from jaxquant.core import QArray
from jaxquant.nn import QuantMode, Transformer, TransformerConfig, convert
from jaxquant.nn.mesh import (
    MESH_AXES,
    ShardingError,
    batch_sharding,
    logical_axes,
    make_mesh,
    param_partition_specs,
    param_shardings,
    parse_mesh_spec,
    shard_params,
)


def test_parse_mesh_spec_fills_every_axis():
    assert parse_mesh_spec("data=2,fsdp=2,tensor=2") == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parse_mesh_spec(" tensor = 8 ") == {"data": 1, "fsdp": 1, "tensor": 8}
    assert parse_mesh_spec({"fsdp": 4, "data": 2}) == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("data=3", "has 3 devices, but there are 8"),
        ("data=2,tensor=8", "has 16 devices"),
        ("model=8", "unknown axis 'model'"),
        ("data=2,,tensor=4", "cannot read ''"),
        ("data:8", "cannot read 'data:8'"),
        ("data=0,tensor=8", "size >= 1"),
        ("data=2,data=4", "given twice"),
        ("", "empty mesh spec"),
    ],
)
def test_bad_mesh_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(spec)


def test_make_mesh_shapes():
    mesh = make_mesh("fsdp=4,tensor=2")
    assert mesh.axis_names == MESH_AXES and dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    small = make_mesh("tensor=4", devices=jax.devices()[:4])
    assert small.devices.size == 4


QCFG = TransformerConfig.tiny().with_quantization(
    jq.weight_only("int4", group_size=32), head=jq.weight_only("int8"))
TOKENS = np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, 256))


@pytest.fixture(scope="module")
def params():
    model = Transformer(QCFG)
    float_params = model.init(jax.random.key(0), TOKENS)["params"]
    return float_params, convert(model, float_params)


def test_logical_axes_of_the_transformer(params):
    axes = logical_axes(params[0])
    assert axes["embed/embedding"] == ("vocab", "embed")
    assert axes["block_1/attn/q_proj/kernel"] == ("embed", "heads")
    assert axes["block_1/attn/k_proj/kernel"] == ("embed", "kv")
    assert axes["block_0/attn/o_proj/kernel"] == ("heads", "embed")
    assert axes["block_0/mlp/down_proj/kernel"] == ("mlp", "embed")
    assert axes["final_norm/scale"] == ("norm",)
    assert logical_axes(params[1]) == axes  # QArrays carry their float tensor's axes


def test_float_and_serving_specs_agree(params):
    float_params, serve = params
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    fs, ss = param_partition_specs(float_params, mesh), param_partition_specs(serve, mesh)
    assert fs["block_0"]["mlp"]["down_proj"]["kernel"] == P("tensor", "fsdp")
    assert fs["block_0"]["attn_norm"]["scale"] == P(None)
    q = ss["block_0"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(q, QArray) and q.qvalue == q.scale == P("tensor", "fsdp")
    emb = ss["embed"]["embedding"]  # int8, a scale per vocab row
    assert emb.qvalue == fs["embed"]["embedding"] == P("tensor", "fsdp")
    assert emb.scale == P("tensor", None)


def test_indivisible_serving_params_error_or_replicate(params):
    serve = params[1]
    mesh = make_mesh("fsdp=4,tensor=2")  # 64 input rows = 2 int4 groups of 32: 4 shards cut one
    with pytest.raises(ShardingError, match=r"block_0/attn/k_proj/kernel: .*would cut a group"):
        param_shardings(serve, mesh)
    relaxed = param_shardings(serve, mesh, strict=False)
    q = relaxed["block_0"]["attn"]["q_proj"]["kernel"]
    assert q.qvalue.spec == q.scale.spec == P(None, "tensor")


def test_sharded_serving_forward_equals_one_device(params):
    serve = params[1]
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    model = Transformer(QCFG, mode=QuantMode.SERVE)
    f = jax.jit(lambda p, t: model.apply({"params": p}, t))
    sharded = shard_params(serve, mesh)
    q = sharded["block_0"]["attn"]["q_proj"]["kernel"]
    assert q.qvalue.sharding.spec == P("fsdp", "tensor") and not q.scale.sharding.is_fully_replicated
    out = f(sharded, jax.device_put(TOKENS, batch_sharding(mesh)))
    ref = f(serve, TOKENS)
    np.testing.assert_allclose(out, ref, atol=1e-5 * float(np.abs(ref).max()), rtol=0)


@pytest.mark.slow  # four decode compiles: ~40 s of CPU
def test_sharded_prefill_and_decode_with_int8_kv_cache(params):
    """TP-sharded int4 weights and an int8 KV cache split over batch and KV heads: the greedy
    tokens equal one device's, and the cache stays sharded through the steps."""
    from jaxquant.nn import decode_step, init_kv_cache, prefill

    serve = params[1]
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    model = Transformer(QCFG, mode=QuantMode.SERVE)
    prompt = TOKENS[:, :8]

    def greedy(p, cache, prompt):
        logits, cache = prefill(model, p, prompt, cache)
        out, all_logits = [], []
        for _ in range(4):
            nxt = np.asarray(jax.numpy.argmax(logits[:, -1:], axis=-1), np.int32)
            out.append(nxt)
            all_logits.append(np.asarray(logits[:, -1]))
            logits, cache = decode_step(model, p, jax.device_put(nxt, prompt.sharding), cache)
        return np.concatenate(out, 1), np.stack(all_logits), cache

    cache = init_kv_cache(QCFG, batch=8, max_len=16, qtype="int8")
    ref_tokens, ref_logits, _ = greedy(serve, cache, jax.numpy.asarray(prompt))
    tokens, logits, scache = greedy(shard_params(serve, mesh),
                                    shard_params(cache, mesh),
                                    jax.device_put(prompt, batch_sharding(mesh)))
    k = scache.layers[1].k
    want = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    assert k.sharding.is_equivalent_to(want, k.ndim), k.sharding
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4 * float(np.abs(ref_logits).max()))
