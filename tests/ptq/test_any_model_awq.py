"""AWQ and SmoothQuant on any model ``jq.quantize_model`` handles (jaxquant.ptq.any_model):
a per-input-channel ``input_scale`` s kept by the served layer, which computes
``(x / s) . Q(W * s)``.

The models and inputs are those of test_any_model_ptq.py (a Dense MLP, DenseGeneral over two
axes and an Einsum, a CNN, an NNX Linear + Conv model).
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

import jaxquant as jq
from jaxquant.nn.any_model import layer_plans, restore_serving, save_serving, to_serving
from jaxquant.nn.layer_quant import Op
from jaxquant.ptq.any_model import calibrate_and_convert
from jaxquant.ptq.any_model_scales import AWQConfig, SmoothQuantConfig
from jaxquant.ptq.hessian import stats_init, stats_update
from jaxquant.ptq.kernel_view import to_matrix
from tests.ptq.test_any_model_ptq import (
    CNN,
    INT4,
    INT4_G16,
    MLP,
    NNXMLP,
    D,
    NDModel,
    images,
    rel_err,
    same_tree,
    vectors,
)

FIXED = AWQConfig(alpha=0.5)  # a scale that is not 1 on every layer, for the algebra tests
CONV_RULES = [jq.QuantRule("Conv_1", None),  # the grouped conv: no per-channel AWQ scale
              jq.QuantRule(".*", jq.weight_only("int4", group_size=4))]
LINEN = {
    "mlp": (MLP, lambda k, n: vectors(k, (n, D)), [jq.QuantRule(".*", INT4_G16)]),
    "nd": (NDModel, lambda k, n: vectors(k, (n, 4, D)), [jq.QuantRule(".*", INT4)]),
    "cnn": (CNN, images, CONV_RULES),
}


@functools.cache
def linen_awq(name: str) -> SimpleNamespace:
    """A linen model, its quantized form, float variables, 2 calibration batches, held-out
    inputs, and its serving variables by AWQ with alpha 0.5."""
    cls, inputs, rules = LINEN[name]
    model = cls()
    x = inputs(0, 2)
    qmodel = jq.quantize_model(model, rules, x)
    variables = jax.jit(model.init)(jax.random.key(1), x)
    batches = [(inputs(10 + i, 64),) for i in range(2)]
    awq = calibrate_and_convert(qmodel, variables, batches, method=FIXED)
    return SimpleNamespace(model=model, qmodel=qmodel, variables=variables, batches=batches,
                           x=inputs(99, 128), awq=awq)


@functools.cache
def nnx_awq() -> SimpleNamespace:
    model = NNXMLP(nnx.Rngs(0))
    rules = [jq.QuantRule("conv", jq.weight_only("int4", group_size=4)),
             jq.QuantRule(".*", INT4_G16)]
    qmodel = jq.quantize_model(model, rules, images(0, 2))
    batches = [(images(10 + i, 64),) for i in range(2)]
    return SimpleNamespace(model=model, qmodel=qmodel, batches=batches, x=images(99, 128),
                           awq=calibrate_and_convert(qmodel, batches, method=FIXED))


def _on_kernel(plan, s) -> jax.Array:
    """The input scale ``s`` (contracted kernel axes ascending; conv: ``[in]``) broadcast
    against the kernel: the rows of ``W * s``."""
    nd = len(plan.kernel_shape)
    axes = (nd - 2,) if plan.op is Op.CONV else tuple(sorted(plan.contracting_axes))
    shape = [plan.kernel_shape[a] if a in axes else 1 for a in range(nd)]
    return jnp.reshape(s, shape)


# --- (a) s = 1 is RTN -------------------------------------------------------------------------


def test_awq_with_unit_scale_is_rtn_exactly():
    """``n_grid=1`` searches ``alpha = 0`` only, so ``s = 1``: the kernels are RTN's bit for bit
    and the served output is RTN's (``method="rtn"`` is ``to_serving``: test_any_model_ptq)."""
    r = linen_awq("mlp")
    got = calibrate_and_convert(r.qmodel, r.variables, r.batches, method=AWQConfig(n_grid=1))
    rtn = calibrate_and_convert(r.qmodel, r.variables, None, method="rtn")
    for layer in ("Dense_0", "Dense_1"):
        assert same_tree(got["params"][layer]["kernel"], rtn["params"][layer]["kernel"])
        np.testing.assert_array_equal(got["params"][layer]["input_scale"], np.ones(D))
    np.testing.assert_array_equal(r.qmodel.apply(got, r.x), r.qmodel.apply(rtn, r.x))

    r = nnx_awq()
    got = calibrate_and_convert(r.qmodel, r.batches, method=AWQConfig(n_grid=1))
    rtn = calibrate_and_convert(r.qmodel, None, method="rtn")
    for layer in ("conv", "fc1", "fc2"):
        assert same_tree(getattr(got, layer).kernel.get_value(),
                         getattr(rtn, layer).kernel.get_value())
    np.testing.assert_array_equal(got(r.x), rtn(r.x))


# --- (b) serving is (x / s) . Q(W * s) --------------------------------------------------------


def _effective(plan, q, s, w):
    """Checks ``q`` is RTN of ``W * s`` and returns the float kernel the layer computes with,
    ``dequant(Q(W * s)) / s``."""
    assert np.all(np.asarray(s) > 0) and not np.allclose(s, 1.0), plan.path  # a real scale
    ref = plan.quantize_kernel(w * _on_kernel(plan, s))
    assert same_tree(q, ref), plan.path
    return q.dequantize(jnp.float32) / _on_kernel(plan, s)


@pytest.mark.parametrize("name", sorted(LINEN))
def test_served_awq_is_divide_then_quantized_product_linen(name):
    """Dense, DenseGeneral over two axes, Einsum, Conv: the served model equals the float model
    with each kernel replaced by ``dequant(Q(W * s)) / s``, within float rounding."""
    r = linen_awq(name)
    plans, params = layer_plans(r.qmodel), dict(r.variables["params"])
    for path, plan in plans.items():
        sp = r.awq["params"][path]
        params[path] = {**params[path], "kernel": _effective(
            plan, sp["kernel"], sp["input_scale"], params[path]["kernel"])}
    want = r.model.apply({"params": params}, r.x)
    got = jax.jit(r.qmodel.apply)(r.awq, r.x)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))
    assert {p.op for p in plans.values()} >= ({Op.CONV} if name == "cnn" else {Op.DOT})


def test_served_awq_is_divide_then_quantized_product_nnx():
    r = nnx_awq()
    ref = nnx.clone(r.model)
    for path, plan in layer_plans(r.qmodel).items():
        layer = getattr(r.awq, path)
        w = _effective(plan, layer.kernel.get_value(), layer.input_scale.get_value(),
                       getattr(r.model, path).kernel.get_value())
        getattr(ref, path).kernel.set_value(w)
    want = ref(r.x)
    np.testing.assert_allclose(r.awq(r.x), want, rtol=2e-5,
                               atol=2e-5 * float(jnp.abs(want).max()))
    assert isinstance(r.awq, NNXMLP) and isinstance(r.awq.fc1, nnx.Linear)
    assert r.qmodel.fc1.kernel.get_value().dtype == jnp.float32  # the qmodel is unchanged


# --- (c) outlier input channels: AWQ beats RTN, SmoothQuant beats plain W8A8 ------------------

OUTLIERS = (3, 11, 20)


def _outlier_inputs(seed: int, n: int) -> jax.Array:
    """:func:`vectors` with input channels ``OUTLIERS`` 30x larger."""
    return vectors(seed, (n, D)) * jnp.ones(D).at[jnp.asarray(OUTLIERS)].set(30.0)


def _h_error(w_eff, w, x) -> float:
    """``tr(dW^T X^T X dW) / tr(W^T X^T X W)``: the layer's relative output error on ``x``."""
    dw, w = w_eff - w, jnp.asarray(w)
    return float(jnp.sum(jnp.square(x @ dw)) / jnp.sum(jnp.square(x @ w)))


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_rtn_on_outlier_channels(bits):
    """Dense_0 reads the outlier inputs directly: its output error in the H norm, on the
    calibration inputs and on held-out ones, is lower with AWQ than with RTN."""
    model = MLP()
    x0 = _outlier_inputs(0, 2)
    qmodel = jq.quantize_model(model, [jq.QuantRule(".*", jq.weight_only(f"int{bits}",
                                                                         group_size=16))], x0)
    variables = jax.jit(model.init)(jax.random.key(1), x0)
    batches = [(_outlier_inputs(10 + i, 64),) for i in range(3)]
    awq = calibrate_and_convert(qmodel, variables, batches, method="awq")
    rtn = to_serving(qmodel, variables)
    w = variables["params"]["Dense_0"]["kernel"]
    calib, held = jnp.concatenate([b[0] for b in batches]), _outlier_inputs(99, 256)
    sp = awq["params"]["Dense_0"]
    w_awq = sp["kernel"].dequantize(jnp.float32) / sp["input_scale"][:, None]
    w_rtn = rtn["params"]["Dense_0"]["kernel"].dequantize(jnp.float32)
    for x in (calib, held):
        e_awq, e_rtn = _h_error(w_awq, w, x), _h_error(w_rtn, w, x)
        assert e_awq < 0.7 * e_rtn, (bits, e_awq, e_rtn)
    ref = model.apply(variables, held)
    assert rel_err(qmodel.apply(awq, held), ref) < rel_err(qmodel.apply(rtn, held), ref)


def test_smoothquant_beats_plain_w8a8_on_outlier_channels():
    """With per-token int8 activations, the outlier channels squash the others' resolution;
    SmoothQuant (alpha 0.5) moves them into the weights and the output error drops."""
    model = MLP()
    x0 = _outlier_inputs(0, 2)
    qmodel = jq.quantize_model(model, [jq.QuantRule(".*", jq.w8a8())], x0)
    variables = jax.jit(model.init)(jax.random.key(1), x0)
    batches = [(_outlier_inputs(10 + i, 64),) for i in range(3)]
    smooth = calibrate_and_convert(qmodel, variables, batches, method="smoothquant")
    plain = to_serving(qmodel, variables)
    held = _outlier_inputs(99, 256)
    ref = model.apply(variables, held)
    e_sq, e_plain = rel_err(qmodel.apply(smooth, held), ref), rel_err(
        qmodel.apply(plain, held), ref)
    assert e_sq < 0.7 * e_plain, (e_sq, e_plain)
    s = smooth["params"]["Dense_0"]["input_scale"]
    assert float(s[jnp.asarray(OUTLIERS)].min()) > float(jnp.median(s))


# --- (d) save / restore ----------------------------------------------------------------------


def test_save_restore_of_an_awq_served_model_serves_bit_identically(tmp_path):
    r = linen_awq("nd")
    save_serving(tmp_path / "linen", r.qmodel, r.awq)
    qmodel, tree = restore_serving(tmp_path / "linen", r.model, r.x[:2])
    assert same_tree(tree, r.awq)
    np.testing.assert_array_equal(qmodel.apply(tree, r.x), r.qmodel.apply(r.awq, r.x))

    r = nnx_awq()
    save_serving(tmp_path / "nnx", r.awq)
    served = restore_serving(tmp_path / "nnx", NNXMLP(nnx.Rngs(5)), r.x[:2])
    np.testing.assert_array_equal(served.fc2.input_scale.get_value(),
                                  r.awq.fc2.input_scale.get_value())
    np.testing.assert_array_equal(served(r.x), r.awq(r.x))


# --- sequential (blocks=) ---------------------------------------------------------------------


def test_sequential_awq_searches_each_block_on_the_quantized_blocks_before_it():
    """With ``blocks``, Dense_1's scale is searched on inputs computed with Dense_0 served
    (``Q(W * s) / s``), and Dense_0 is the one-shot one."""
    r = linen_awq("mlp")
    seq = calibrate_and_convert(r.qmodel, r.variables, r.batches, method="awq",
                                blocks=r"Dense_\d+")
    one_shot = calibrate_and_convert(r.qmodel, r.variables, r.batches, method="awq")
    assert same_tree(seq["params"]["Dense_0"], one_shot["params"]["Dense_0"])
    p, sp = r.variables["params"], seq["params"]
    w0 = sp["Dense_0"]["kernel"].dequantize(jnp.float32) / sp["Dense_0"]["input_scale"][:, None]
    stats = stats_init(D)
    for (x,) in r.batches:
        stats = stats_update(stats, nn.relu(x @ w0 + p["Dense_0"]["bias"]))
    plan = layer_plans(r.qmodel)["Dense_1"]
    stats = jax.tree.map(lambda a: a[None], stats)
    s, _ = AWQConfig().scale(plan, to_matrix(plan, p["Dense_1"]["kernel"]), stats)
    np.testing.assert_allclose(sp["Dense_1"]["input_scale"], s, rtol=1e-5)


# --- (e) bad input ----------------------------------------------------------------------------


def test_bad_input_raises_one_line_value_errors():
    r = linen_awq("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grouped = jq.quantize_model(CNN(), [jq.QuantRule(".*", INT4)], images(0, 2))
    cnn = linen_awq("cnn")
    cases = {
        "Conv_1.*feature groups": lambda: calibrate_and_convert(
            grouped, cnn.variables, cnn.batches[:1], method="awq"),
        "Dense_0: method='smoothquant'.*keeps activations float": lambda: calibrate_and_convert(
            r.qmodel, r.variables, r.batches[:1], method="smoothquant"),
        "'awq', 'awq\\+gptq', 'smoothquant'.*got 'awg'": lambda: calibrate_and_convert(
            r.qmodel, r.variables, r.batches[:1], method="awg"),
        "or an AWQConfig / SmoothQuantConfig, got a int": lambda: calibrate_and_convert(
            r.qmodel, r.variables, r.batches[:1], method=3),
        "method='awq' needs calib_batches": lambda: calibrate_and_convert(
            r.qmodel, r.variables, None, method="awq"),
        "n_grid must be a positive int": lambda: AWQConfig(n_grid=0),
        "alpha must be in": lambda: SmoothQuantConfig(alpha=1.5),
    }
    for match, call in cases.items():
        with pytest.raises(ValueError, match=match) as e:
            call()
        assert "\n" not in str(e.value) and len(str(e.value)) < 500, str(e.value)
