"""Calibrated PTQ (GPTQ) of any model ``jq.quantize_model`` handles: jaxquant.ptq.any_model.

Every GPTQ'd matrix here is ``[32, 32]`` (int4, groups of 16 rows, or per channel for the N-D
kernels that contract two axes), so the solver compiles twice for the whole file.
"""

from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jaxquant as jq
from jaxquant.nn.any_model import layer_plans, to_serving
from jaxquant.nn.layer_quant import Op, make_plan
from jaxquant.ptq.any_model import calibrate_and_convert
from jaxquant.ptq.gptq import gptq_quantize
from jaxquant.ptq.kernel_view import conv_rows, from_matrix, matrix_spec, to_matrix

D = 32
INT4_G16 = jq.weight_only("int4", group_size=16)
INT4 = jq.weight_only("int4")


def _normal(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _mix(d: int) -> np.ndarray:
    """A fixed mixing matrix with decaying row scales: inputs ``z @ mix`` are correlated and
    anisotropic (GPTQ's error feedback has directions to exploit)."""
    return _normal(123, (d, d)) * np.exp(-np.arange(d, dtype=np.float32) / 5.0)[:, None]


def vectors(seed: int, shape) -> jax.Array:
    """``[*shape[:-1], D]`` correlated inputs (the calibration distribution)."""
    return jnp.asarray(_normal(seed, (*shape[:-1], D)) @ _mix(D) + 0.5)


def images(seed: int, n) -> jax.Array:
    """``[n, 8, 8, 8]`` correlated images (2x2 blocks of noise plus a little pixel noise, mixed
    channels)."""
    z = np.repeat(np.repeat(_normal(seed, (n, 4, 4, 8)), 2, axis=1), 2, axis=2)
    z = z + 0.3 * _normal(seed + 1000, (n, 8, 8, 8))
    return jnp.asarray(z @ _mix(D)[:8, :8] + 0.3)


def rel_err(y, ref) -> float:
    return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


def same_tree(a, b) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                             strict=True))


# --- the models ---------------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(D)(x))
        return nn.Dense(D)(h)


class CNN(nn.Module):
    """A conv (im2col ``[8 * 2 * 2, 32]``), then a grouped conv (4 feature groups of
    ``[8 * 2 * 2, 32]``)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(D, (2, 2))(x))
        x = nn.Conv(4 * D, (2, 2), strides=2, padding="VALID", feature_group_count=4)(x)
        return x.mean(axis=(1, 2))


class NDModel(nn.Module):
    """DenseGeneral to heads ``[32, 2, 16]``, Einsum over them ``[2, 16, 32]``, DenseGeneral
    over two axes ``[2, 16, 32]``."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 16))(x)
        y = nn.Einsum((2, 16, D), "bshk,hkd->bsd")(nn.gelu(h))
        h2 = nn.relu(h + y.reshape(h.shape))
        return nn.DenseGeneral(D, axis=(-2, -1))(h2)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(D, D, rngs=rngs)
        self.conv = nnx.Conv(8, D, (2, 2), rngs=rngs)
        self.fc2 = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.conv(x)).mean(axis=(1, 2))
        return self.fc2(nnx.relu(self.fc1(h)))


LINEN = {
    "mlp": (MLP, lambda k, n: vectors(k, (n, D)), [jq.QuantRule(".*", INT4_G16)]),
    "cnn": (CNN, images, [jq.QuantRule(".*", jq.weight_only("int4", group_size=4))]),
    "nd": (NDModel, lambda k, n: vectors(k, (n, 4, D)), [jq.QuantRule(".*", INT4)]),
}


@functools.cache
def linen_run(name: str) -> SimpleNamespace:
    """A linen model, its quantized form, float variables, 4 calibration batches of 64, held-out
    inputs, and its RTN (``to_serving``) and GPTQ serving variables (computed once)."""
    cls, inputs, rules = LINEN[name]
    model = cls()
    x = inputs(0, 2)
    qmodel = jq.quantize_model(model, rules, x)
    variables = jax.jit(model.init)(jax.random.key(1), x)
    batches = [(inputs(10 + i, 64),) for i in range(4)]
    return SimpleNamespace(
        model=model, qmodel=qmodel, variables=variables, batches=batches, x=inputs(99, 256),
        rtn=to_serving(qmodel, variables), gptq=calibrate_and_convert(qmodel, variables, batches))


@functools.cache
def nnx_run() -> SimpleNamespace:
    """The NNX model's counterpart of :func:`linen_run` (``served``: the GPTQ serving copy)."""
    model = NNXMLP(nnx.Rngs(0))
    rules = [jq.QuantRule("conv", jq.weight_only("int4", group_size=4)),
             jq.QuantRule(".*", INT4_G16)]
    qmodel = jq.quantize_model(model, rules, images(0, 2))
    batches = [(images(10 + i, 64),) for i in range(4)]
    return SimpleNamespace(model=model, qmodel=qmodel, batches=batches, x=images(99, 256),
                           rtn=to_serving(qmodel), served=calibrate_and_convert(qmodel, batches))


# --- (c) im2col ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x_shape,k_shape,kw",
    [
        ((2, 7, 6, 3), (3, 2, 3, 5), dict(window_strides=(2, 1), padding="SAME",
                                          rhs_dilation=(1, 2))),
        ((2, 6, 6, 4), (2, 2, 2, 6), dict(window_strides=(1, 1), padding=((1, 0), (0, 2)),
                                          feature_group_count=2)),
        ((2, 9, 4), (3, 4, 8), dict(window_strides=(2,), padding=((1, 2),), lhs_dilation=(2,))),
        ((1, 5, 5, 3, 2), (2, 1, 2, 2, 4), dict(window_strides=(1, 1, 1), padding="SAME")),
    ],
)
def test_im2col_rows_times_kernel_matrix_is_the_conv(x_shape, k_shape, kw):
    """The patches' feature order is the kernel matrix's row order: ``rows_j @ w2[:, cols_j]``
    is the conv's output for each feature group ``j`` (strides, padding, dilations, 1-3 D)."""
    x = jnp.asarray(_normal(0, x_shape))
    w = jnp.asarray(_normal(1, k_shape))
    nd = len(k_shape)
    spatial = "HWD"[: nd - 2]
    dn = lax.conv_dimension_numbers(x.shape, w.shape, (f"N{spatial}C", f"{spatial}IO",
                                                       f"N{spatial}C"))
    y = lax.conv_general_dilated(x, w, dimension_numbers=dn, precision="highest", **kw)
    plan = make_plan("c", "Conv", Op.CONV, k_shape, tuple(range(nd - 1)), INT4)
    g = kw.get("feature_group_count", 1)
    rows = conv_rows(plan, x, w.shape, kw["window_strides"], kw["padding"],
                     kw.get("lhs_dilation"), kw.get("rhs_dilation"), dn, g)
    w2 = to_matrix(plan, w)
    cols = w.shape[-1] // g
    out = jnp.concatenate(
        [jnp.matmul(rows[j], w2[:, j * cols:(j + 1) * cols], precision="highest")
         for j in range(g)], axis=1)
    np.testing.assert_allclose(out, y.reshape(-1, w.shape[-1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(from_matrix(plan, w2), w)


# --- RTN through the same function is to_serving -------------------------------------------------


@pytest.mark.parametrize("name", sorted(LINEN))
def test_rtn_through_the_matrix_views_is_to_serving_linen(name):
    r = linen_run(name)
    got = calibrate_and_convert(r.qmodel, r.variables, None, method="rtn")
    assert same_tree(got, r.rtn)


def test_rtn_through_the_matrix_views_is_to_serving_nnx():
    r = nnx_run()
    got = calibrate_and_convert(r.qmodel, None, method="rtn")
    assert same_tree(nnx.state(got), nnx.state(r.rtn))
    np.testing.assert_array_equal(got(r.x), r.rtn(r.x))


# --- (a) GPTQ beats RTN on held-out inputs ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LINEN))
def test_gptq_beats_rtn_on_held_out_inputs_linen(name):
    r = linen_run(name)
    ref = r.model.apply(r.variables, r.x)
    rtn = rel_err(r.qmodel.apply(r.rtn, r.x), ref)
    gptq = rel_err(r.qmodel.apply(r.gptq, r.x), ref)
    assert gptq < 0.85 * rtn, (gptq, rtn)


def test_gptq_beats_rtn_on_held_out_inputs_nnx():
    r = nnx_run()
    ref = r.model(r.x)
    rtn, gptq = rel_err(r.rtn(r.x), ref), rel_err(r.served(r.x), ref)
    assert gptq < 0.85 * rtn, (gptq, rtn)
    assert isinstance(r.served, NNXMLP) and r.qmodel.fc1.kernel.get_value().dtype == jnp.float32


# --- (b) what the model serves is the layer-level GPTQ ------------------------------------------


def _hessian(batches_rows):
    """``2 X^T X / n`` over the rows of every batch, summed batch by batch."""
    xtx, n = 0.0, 0
    for rows in batches_rows:
        rows = jnp.asarray(rows, jnp.float32).reshape(-1, rows.shape[-1])
        xtx = xtx + jnp.matmul(rows.T, rows, precision="highest")
        n += rows.shape[0]
    return 2.0 * xtx / n


def _assert_serves(plan, q, w, batches_rows):
    """``q`` (the served kernel) is ``gptq_quantize`` of ``w``'s matrix on the Hessian of the
    layer inputs' rows, one ``[..., d_in]`` array per calibration batch."""
    ref, _ = gptq_quantize(to_matrix(plan, w), _hessian(batches_rows), matrix_spec(plan))
    np.testing.assert_array_equal(q.dequantize(jnp.float32), from_matrix(plan, ref.dequantize()))
    assert q.qvalue.dtype == ref.qvalue.dtype and q.pack_axis is not None


def test_served_kernels_are_the_layer_gptq_linen_dense_and_nd():
    r = linen_run("mlp")
    p, sp, plans = r.variables["params"], r.gptq["params"], layer_plans(r.qmodel)
    xs = [b[0] for b in r.batches]
    _assert_serves(plans["Dense_0"], sp["Dense_0"]["kernel"], p["Dense_0"]["kernel"], xs)
    hs = [nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]) for x in xs]
    _assert_serves(plans["Dense_1"], sp["Dense_1"]["kernel"], p["Dense_1"]["kernel"], hs)

    r = linen_run("nd")
    p, sp, plans = r.variables["params"], r.gptq["params"], layer_plans(r.qmodel)
    einsum_in, dense_in = [], []
    for (x,) in r.batches:
        _, inter = r.model.apply(r.variables, x, capture_intermediates=True)
        (h,) = inter["intermediates"]["DenseGeneral_0"]["__call__"]
        (y,) = inter["intermediates"]["Einsum_0"]["__call__"]
        einsum_in.append(nn.gelu(h).reshape(-1, D))
        dense_in.append(nn.relu(h + y.reshape(h.shape)).reshape(-1, D))
    _assert_serves(plans["Einsum_0"], sp["Einsum_0"]["kernel"], p["Einsum_0"]["kernel"],
                   einsum_in)
    _assert_serves(plans["DenseGeneral_1"], sp["DenseGeneral_1"]["kernel"],
                   p["DenseGeneral_1"]["kernel"], dense_in)


def test_served_kernels_are_the_layer_gptq_conv_and_nnx():
    r = linen_run("cnn")
    patches = [lax.conv_general_dilated_patches(x, (2, 2), (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
               for (x,) in r.batches]
    _assert_serves(layer_plans(r.qmodel)["Conv_0"], r.gptq["params"]["Conv_0"]["kernel"],
                   r.variables["params"]["Conv_0"]["kernel"], patches)

    r = nnx_run()
    hs = [nnx.relu(r.model.conv(x)).mean(axis=(1, 2)) for (x,) in r.batches]
    _assert_serves(layer_plans(r.qmodel)["fc1"], r.served.fc1.kernel.get_value(),
                   r.model.fc1.kernel.get_value(), hs)


# --- sequential GPTQ (blocks=) ----------------------------------------------------------------


def test_sequential_gptq_calibrates_each_block_on_the_quantized_blocks_before_it():
    """With ``blocks``, a layer's Hessian comes from inputs computed with the earlier blocks'
    kernels already quantized (and the first block's is the one-shot one)."""
    r = linen_run("mlp")
    seq = calibrate_and_convert(r.qmodel, r.variables, r.batches, blocks=r"Dense_\d+")
    plans, p, sp = layer_plans(r.qmodel), r.variables["params"], seq["params"]
    assert same_tree(sp["Dense_0"], r.gptq["params"]["Dense_0"])
    w0 = sp["Dense_0"]["kernel"].dequantize(jnp.float32)
    hs = [nn.relu(x @ w0 + p["Dense_0"]["bias"]) for (x,) in r.batches]
    _assert_serves(plans["Dense_1"], sp["Dense_1"]["kernel"], p["Dense_1"]["kernel"], hs)
    assert not same_tree(sp["Dense_1"], r.gptq["params"]["Dense_1"])

    r = nnx_run()
    served = calibrate_and_convert(r.qmodel, r.batches, blocks=r"fc\d")
    ref = nnx.clone(r.model)
    for name in ("conv", "fc1"):
        getattr(ref, name).kernel.set_value(getattr(served, name).kernel.get_value().dequantize())
    hs = [nnx.relu(ref.fc1(nnx.relu(ref.conv(x)).mean(axis=(1, 2)))) for (x,) in r.batches]
    _assert_serves(layer_plans(r.qmodel)["fc2"], served.fc2.kernel.get_value(),
                   r.model.fc2.kernel.get_value(), hs)
    with pytest.raises(ValueError, match="matches the start of no quantized layer"):
        calibrate_and_convert(r.qmodel, r.batches, blocks=r"block_\d+")


# --- (d) bad input ------------------------------------------------------------------------------


def test_bad_input_raises_one_line_value_errors():
    r = linen_run("mlp")
    qmodel, variables, batches = r.qmodel, r.variables, r.batches[:1]
    cases = {
        "wrong shape": lambda: calibrate_and_convert(
            qmodel, variables, [(jnp.ones((4, D - 3)),)]),
        "empty": lambda: calibrate_and_convert(qmodel, variables, []),
        "empty generator": lambda: calibrate_and_convert(qmodel, variables, iter(())),
        "unknown method": lambda: calibrate_and_convert(qmodel, variables, batches,
                                                        method="awq2"),
        "not tuples": lambda: calibrate_and_convert(qmodel, variables, [batches[0][0]]),
        "one array": lambda: calibrate_and_convert(qmodel, variables, batches[0][0]),
        "no variables": lambda: calibrate_and_convert(qmodel, batches),
        "gptq without data": lambda: calibrate_and_convert(qmodel, variables, None),
    }
    for what, call in cases.items():
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and len(msg) < 500, (what, msg)
    with pytest.raises(ValueError, match=r"calib_batches\[0\].*\(4, 29\)"):
        cases["wrong shape"]()
    with pytest.raises(ValueError, match="empty"):
        cases["empty"]()
    with pytest.raises(ValueError, match="'rtn', 'gptq'"):
        cases["unknown method"]()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nf4 = jq.quantize_model(MLP(), [jq.QuantRule(".*", jq.weight_only("nf4"))],
                                batches[0][0])
    with pytest.raises(ValueError, match="Dense_0: GPTQ needs intN"):
        calibrate_and_convert(nf4, variables, batches)

    with pytest.raises(ValueError, match="NNX model holds its own params"):
        calibrate_and_convert(nnx_run().qmodel, {"params": {}}, batches)
