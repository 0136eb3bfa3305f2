"""GPTQ swept with the output columns split over a device mesh (8 fake CPU devices) equals the
one-device sweep: the same codes and scales, and GPTQ's loss summed over the devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant.core import QuantSpec, dequantize
from jaxquant.nn.mesh import make_mesh
from jaxquant.ptq.gptq import GPTQConfig, column_axes, gptq_quantize

D_IN, D_OUT = 128, 64


def _layer(seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    # Correlated inputs, so the error feedback does real work.
    x = jax.random.normal(kx, (512, D_IN)) @ (jnp.eye(D_IN) + 0.3 * jax.random.normal(kw, (D_IN, D_IN)))
    w = jax.random.normal(jax.random.fold_in(kw, 1), (D_IN, D_OUT)) / np.sqrt(D_IN)
    return w, 2 * x.T @ x / x.shape[0]


CASES = {
    "int4_g32_act_order": (QuantSpec(qtype="int4", group_size=32, full_range=True),
                           GPTQConfig()),
    "int4_g32_no_act_order": (QuantSpec(qtype="int4", group_size=32),
                              GPTQConfig(act_order=False, block_size=32)),
    "int3_per_column_asym": (QuantSpec(qtype="int3", symmetric=False), GPTQConfig()),
}


COLUMNS = ("tensor=4,fsdp=2", P(None, ("tensor", "fsdp")))  # split by columns over 8
ROWS = ("data=2,tensor=4", P("tensor", None))  # a row-parallel layer: swept by columns over 4


@pytest.mark.parametrize("name,mesh_spec,spec", [
    ("int4_g32_act_order", *COLUMNS), ("int4_g32_no_act_order", *ROWS),
    ("int3_per_column_asym", *COLUMNS)])
def test_column_sharded_gptq_equals_one_device(name, mesh_spec, spec):
    qspec, config = CASES[name]
    w, h = _layer()
    mesh = make_mesh(mesh_spec)
    ws = jax.device_put(w, NamedSharding(mesh, spec))
    got_mesh, axes = column_axes(ws)
    assert got_mesh is mesh and np.prod([mesh.shape[a] for a in axes]) == (
        8 if mesh_spec.startswith("tensor=4,fsdp") else 4)
    one, info1 = gptq_quantize(w, h, qspec, config)
    many, info8 = gptq_quantize(ws, h, qspec, config)
    np.testing.assert_array_equal(np.asarray(many.scale), np.asarray(one.scale))
    # Same per-column arithmetic: codes agree except where a float tie flips one code, and a
    # flipped code moves its weight by exactly one step.
    a, b = np.asarray(dequantize(one)), np.asarray(dequantize(many))
    step = np.broadcast_to(np.abs(np.repeat(np.asarray(one.scale),
                                            D_IN // np.asarray(one.scale).shape[0], 0)), a.shape)
    diff = np.abs(a - b)
    assert np.all(diff <= step * (1 + 1e-5)), "a code moved by more than one step"
    assert np.mean(diff > 0) <= 1e-3, f"{np.mean(diff > 0):.2%} of the codes differ"
    assert info8["loss"] == pytest.approx(info1["loss"], rel=1e-4)


def test_one_device_and_indivisible_columns_stay_unsharded():
    w, _ = _layer()
    assert column_axes(w) is None  # an unplaced array
    mesh = make_mesh("tensor=8")
    odd = jax.device_put(jnp.zeros((D_IN, 12)), NamedSharding(mesh, P("tensor", None)))
    assert column_axes(odd) is None  # 12 columns do not split over 8 devices
