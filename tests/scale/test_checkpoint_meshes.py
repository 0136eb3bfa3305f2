"""Checkpoints across meshes: serving params saved from 8 devices restore onto 4, onto 1 and
onto another axis layout with their codes, scales and float leaves bit-identical."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from jaxquant import checkpoint
from jaxquant.core import QArray
from jaxquant.nn import Transformer, TransformerConfig, convert
from jaxquant.nn.mesh import abstract_on, make_mesh, param_shardings, shard_params

CFG = TransformerConfig.tiny(n_layers=1).with_quantization(
    jq.weight_only("int4", group_size=32), head=jq.weight_only("int8"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = Transformer(CFG)
    params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    serve = convert(model, params)
    sharded = shard_params(serve, make_mesh("data=2,fsdp=2,tensor=2"))
    assert sharded["block_0"]["attn"]["q_proj"]["kernel"].qvalue.sharding.spec == P("fsdp",
                                                                                     "tensor")
    path = checkpoint.save(tmp_path_factory.mktemp("ck") / "serve", sharded)
    return serve, path


@pytest.mark.slow  # 20-45 s on 2 cores; CI runs it in its slow pass
@pytest.mark.parametrize(
    ("spec", "n_devices"),
    [("tensor=4", 4), ("data=1", 1), ("tensor=8", 8)],
    ids=["4dev", "1dev", "tensor8"],
)
def test_restore_onto_another_mesh_is_bit_identical(saved, spec, n_devices):
    serve, path = saved
    mesh = make_mesh(spec, devices=jax.devices()[:n_devices])
    like = jax.eval_shape(lambda: serve)
    shardings = param_shardings(like, mesh, strict=False)
    restored = checkpoint.restore(path, abstract_on(like, shardings))
    is_q = lambda x: isinstance(x, QArray)
    for a, b, s in zip(jax.tree.leaves(serve, is_leaf=is_q),
                       jax.tree.leaves(restored, is_leaf=is_q),
                       jax.tree.leaves(shardings, is_leaf=is_q), strict=True):
        if is_q(a):
            assert (a.qtype, a.shape, a.pack_axis) == (b.qtype, b.shape, b.pack_axis)
            pairs = [(a.qvalue, b.qvalue, s.qvalue), (a.scale, b.scale, s.scale)]
        else:
            pairs = [(a, b, s)]
        for x, y, want in pairs:
            assert y.sharding.is_equivalent_to(want, y.ndim), (y.sharding, want)
            assert len(y.sharding.device_set) == n_devices
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
            assert np.asarray(y).dtype == np.asarray(x).dtype
