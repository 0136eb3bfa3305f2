"""AWQ and SmoothQuant on any model ``jq.quantize_model`` handles (jaxquant.ptq.any_model):
a per-input-channel ``input_scale`` s kept by the served layer, which computes
``(x / s) . Q(W * s)``.

The models and inputs are those of test_any_model_ptq.py (a Dense MLP, DenseGeneral over two
axes and an Einsum, a CNN, an NNX Linear + Conv model), and an NNX model of two Einsums.
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
from jaxquant.core.calibration import calibrate
from jaxquant.core.dot_general import operand_spec
from jaxquant.core.qtypes import get_qtype
from jaxquant.core.spec import resolve_layout
from jaxquant.nn.any_model import layer_plans, restore_serving, save_serving, to_serving
from jaxquant.nn.input_scale import input_scale_shape
from jaxquant.nn.layer_quant import Op
from jaxquant.nn.nnx_model import InputScale
from jaxquant.ptq.any_model import calibrate_and_convert, quantize_layer
from jaxquant.ptq.any_model_scales import AWQConfig, SmoothQuantConfig
from jaxquant.ptq.awq import clip_ranges_hessian, clip_ratio_grid, quantize_with_ranges
from jaxquant.ptq.hessian import stats_init, stats_update
from jaxquant.ptq.kernel_view import to_matrix
from tests.nn.helpers import EPS32, step_per_element
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

# A scale that is not 1 on every layer, for the algebra tests (clip: its own tests, (f)).
FIXED = AWQConfig(alpha=0.5, clip=False)
CONV_RULES = [jq.QuantRule("Conv_1", None),  # the grouped conv: no per-channel AWQ scale
              jq.QuantRule(".*", jq.weight_only("int4", group_size=4))]
LINEN = {
    "mlp": (MLP, lambda k, n: vectors(k, (n, D)), [jq.QuantRule(".*", INT4_G16)]),
    "nd": (NDModel, lambda k, n: vectors(k, (n, 4, D)), [jq.QuantRule(".*", INT4)]),
    "cnn": (CNN, images, CONV_RULES),
}


@functools.cache
def linen_awq(name: str, config: AWQConfig = FIXED) -> SimpleNamespace:
    """A linen model, its quantized form, float variables, 2 calibration batches, held-out
    inputs, and its serving variables by AWQ (``config``: alpha 0.5, no clip)."""
    cls, inputs, rules = LINEN[name]
    model = cls()
    x = inputs(0, 2)
    qmodel = jq.quantize_model(model, rules, x)
    variables = jax.jit(model.init)(jax.random.key(1), x)
    batches = [(inputs(10 + i, 64),) for i in range(2)]
    awq = calibrate_and_convert(qmodel, variables, batches, method=config)
    return SimpleNamespace(model=model, qmodel=qmodel, variables=variables, batches=batches,
                           x=inputs(99, 128), awq=awq)


@functools.cache
def nnx_awq(config: AWQConfig = FIXED) -> SimpleNamespace:
    model = NNXMLP(nnx.Rngs(0))
    rules = [jq.QuantRule("conv", jq.weight_only("int4", group_size=4)),
             jq.QuantRule(".*", INT4_G16)]
    qmodel = jq.quantize_model(model, rules, images(0, 2))
    batches = [(images(10 + i, 64),) for i in range(2)]
    return SimpleNamespace(model=model, qmodel=qmodel, batches=batches, x=images(99, 128),
                           awq=calibrate_and_convert(qmodel, batches, method=config))


def _on_kernel(plan, s) -> jax.Array:
    """The input scale ``s`` (contracted kernel axes ascending; conv: ``[in]``) broadcast
    against the kernel: the rows of ``W * s``."""
    nd = len(plan.kernel_shape)
    axes = (nd - 2,) if plan.op is Op.CONV else tuple(sorted(plan.contracting_axes))
    shape = [plan.kernel_shape[a] if a in axes else 1 for a in range(nd)]
    return jnp.reshape(s, shape)


# --- (a) s = 1 is RTN -------------------------------------------------------------------------


UNIT = AWQConfig(n_grid=1, n_clip_grid=1)  # s = 1, and the clip search tries ratio 1 only


def test_awq_with_unit_scale_is_rtn_exactly():
    """``n_grid=1`` searches ``alpha = 0`` only, so ``s = 1``, and ``n_clip_grid=1`` keeps each
    range (the clipped-ranges path rounds with the spec's own scales): the kernels are RTN's
    bit for bit and the served output is RTN's (``method="rtn"`` is ``to_serving``:
    test_any_model_ptq)."""
    r = linen_awq("mlp")
    got = calibrate_and_convert(r.qmodel, r.variables, r.batches, method=UNIT)
    rtn = calibrate_and_convert(r.qmodel, r.variables, None, method="rtn")
    for layer in ("Dense_0", "Dense_1"):
        assert same_tree(got["params"][layer]["kernel"], rtn["params"][layer]["kernel"])
        np.testing.assert_array_equal(got["params"][layer]["input_scale"], np.ones(D))
    np.testing.assert_array_equal(r.qmodel.apply(got, r.x), r.qmodel.apply(rtn, r.x))

    r = nnx_awq()
    got = calibrate_and_convert(r.qmodel, r.batches, method=UNIT)
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


# --- (f) AWQ's clip search: clipped ranges of W * s, in the H norm -----------------------------

CLIPPED = AWQConfig(alpha=0.5)  # clip=None: on (rounding to nearest)


def _column_h_errors(w, lo, hi, spec, h) -> jax.Array:
    """``dW_o^T H dW_o`` per output column of ``w`` rounded with the ranges ``(lo, hi)``."""
    dw = quantize_with_ranges(w, spec, lo, hi).dequantize(jnp.float32) - w
    return jnp.sum(dw * (h @ dw), axis=0)


def test_clip_search_per_channel_is_the_best_ratio_of_each_column():
    """Per output channel (one group: no coupling), each column's clipped error is the lowest
    of the grid's, by brute force over the ratios; grouped, the total is at most RTN's and
    lower on outlier inputs."""
    x = _outlier_inputs(0, 256)
    h = x.T @ x
    w = jnp.asarray(vectors(3, (D, 24)))
    spec = jq.weight_only("int4").rhs
    lo, hi = clip_ranges_hessian(w, h, spec=spec, n_grid=20)
    full = operand_spec(spec, 2, (0,))
    lo1, hi1 = calibrate(w, full, resolve_layout(full, w.shape))
    brute = jnp.stack([_column_h_errors(w, lo1 * r, hi1 * r, spec, h)
                       for r in clip_ratio_grid(20, 0.5)])
    got = _column_h_errors(w, lo, hi, spec, h)
    np.testing.assert_allclose(got, brute.min(axis=0), rtol=1e-5)
    assert float(jnp.mean(hi / hi1)) < 0.99  # some columns clip

    spec = jq.weight_only("int3", group_size=8).rhs
    lo, hi = clip_ranges_hessian(w, h, spec=spec, n_grid=20)
    full = operand_spec(spec, 2, (0,))
    lo1, hi1 = calibrate(w, full, resolve_layout(full, w.shape))
    clipped = float(jnp.sum(_column_h_errors(w, lo, hi, spec, h)))
    rtn = float(jnp.sum(_column_h_errors(w, lo1, hi1, spec, h)))
    assert clipped < 0.5 * rtn, (clipped, rtn)


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_clip_lowers_the_h_norm_error_of_every_layer(bits):
    """The MLP on outlier inputs: with the clip search, each layer's output error on its
    calibration inputs, in the H norm, is at most that without it (the same input scale), and
    lower in total."""
    model = MLP()
    x0 = _outlier_inputs(0, 2)
    rule = jq.QuantRule(".*", jq.weight_only(f"int{bits}", group_size=16))
    qmodel = jq.quantize_model(model, [rule], x0)
    variables = jax.jit(model.init)(jax.random.key(1), x0)
    batches = [(_outlier_inputs(10 + i, 64),) for i in range(3)]
    on = calibrate_and_convert(qmodel, variables, batches, method="awq")
    off = calibrate_and_convert(qmodel, variables, batches, method=AWQConfig(clip=False))
    p = variables["params"]
    x = jnp.concatenate([b[0] for b in batches])
    inputs = {"Dense_0": x, "Dense_1": nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])}
    total = {"on": 0.0, "off": 0.0}
    for layer, xl in inputs.items():
        w = p[layer]["kernel"]
        errs = {}
        for name, served in (("on", on), ("off", off)):
            sp = served["params"][layer]
            errs[name] = _h_error(sp["kernel"].dequantize(jnp.float32) / sp["input_scale"][:, None],
                                  w, xl)
            total[name] += errs[name]
        np.testing.assert_array_equal(on["params"][layer]["input_scale"],
                                      off["params"][layer]["input_scale"])
        assert errs["on"] <= errs["off"] * (1 + 1e-5), (layer, errs)
    assert total["on"] < 0.9 * total["off"], total


def _effective_clipped(plan, q, s, w):
    """Checks ``q`` is ``W * s`` rounded to nearest with its own scale, a clipped RTN scale
    (each group's ratio to RTN's in ``[0.5, 1]``), and returns ``dequant(q) / s`` and the
    ratios."""
    ws = w * _on_kernel(plan, s)
    assert same_tree(q, plan.quantize_kernel(ws, scale=q.scale, zero_point=q.zero_point))
    ratio = np.asarray(q.scale, np.float32) / np.asarray(plan.quantize_kernel(ws).scale,
                                                         np.float32)
    assert ratio.min() >= 0.5 - 1e-6 and ratio.max() <= 1 + 1e-6, plan.path
    return q.dequantize(jnp.float32) / _on_kernel(plan, s), ratio


@pytest.mark.parametrize("name", sorted(LINEN))
def test_served_clipped_awq_is_divide_then_quantized_product_linen(name):
    """With the clip search, the served kernel is ``W * s`` rounded with clipped scales, and
    the served model equals the float model with each kernel ``dequant(Q(W * s)) / s``."""
    r = linen_awq(name, CLIPPED)
    plans, params = layer_plans(r.qmodel), dict(r.variables["params"])
    ratios = []
    for path, plan in plans.items():
        sp = r.awq["params"][path]
        np.testing.assert_array_equal(sp["input_scale"],
                                      linen_awq(name).awq["params"][path]["input_scale"])
        w, ratio = _effective_clipped(plan, sp["kernel"], sp["input_scale"],
                                      params[path]["kernel"])
        params[path] = {**params[path], "kernel": w}
        ratios.append(ratio.ravel())
    assert np.mean(np.concatenate(ratios) < 1 - 1e-6) > 0.05  # the search clipped some groups
    want = r.model.apply({"params": params}, r.x)
    got = jax.jit(r.qmodel.apply)(r.awq, r.x)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))


def test_served_clipped_awq_is_divide_then_quantized_product_nnx():
    r = nnx_awq(CLIPPED)
    ref = nnx.clone(r.model)
    for path, plan in layer_plans(r.qmodel).items():
        layer = getattr(r.awq, path)
        w, _ = _effective_clipped(plan, layer.kernel.get_value(), layer.input_scale.get_value(),
                                  getattr(r.model, path).kernel.get_value())
        getattr(ref, path).kernel.set_value(w)
    want = ref(r.x)
    np.testing.assert_allclose(r.awq(r.x), want, rtol=2e-5,
                               atol=2e-5 * float(jnp.abs(want).max()))


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


# --- (g) NNX Einsum layers with an input scale -------------------------------------------------


class NNXEinsums(nnx.Module):
    """Two ``nnx.Einsum``: to heads ``[D, 2, 16]``, and back over both head axes ``[2, 16, D]``
    (an input scale ``[2, 16]``)."""

    def __init__(self, rngs):
        self.up = nnx.Einsum("bd,dhk->bhk", (D, 2, 16), (2, 16), rngs=rngs)
        self.down = nnx.Einsum("bhk,hkf->bf", (2, 16, D), (D,), rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(x)))


def test_nnx_einsum_awq_serves_within_the_int4_steps_and_restores(tmp_path):
    """``method="awq"`` (with the clip search) on NNX Einsum layers: each served layer keeps its
    input scale and is within the int4 grid's error bound of the float layer on the same
    inputs, ``|x / s| . e`` where ``e`` is each element's bound on ``|Q(W * s) - W * s|`` (half
    a step, or the excess over a clipped range); save / restore round-trips the scales."""
    model = NNXEinsums(nnx.Rngs(0))
    qmodel = jq.quantize_model(model, [jq.QuantRule(".*", INT4_G16)], _outlier_inputs(0, 2))
    batches = [(_outlier_inputs(10 + i, 64),) for i in range(2)]
    served = calibrate_and_convert(qmodel, batches, method="awq")
    x = _outlier_inputs(99, 128)
    plans = layer_plans(qmodel)
    assert {p.op for p in plans.values()} == {Op.EINSUM}
    qmax = float(get_qtype("int4").qmax)
    for path, inp in (("up", x), ("down", nnx.gelu(model.up(x)))):
        layer, ref, plan = getattr(served, path), getattr(model, path), plans[path]
        assert isinstance(layer.input_scale, InputScale), path
        s = layer.input_scale.get_value()
        assert s.shape == input_scale_shape(plan) == ((D,) if path == "up" else (2, 16))
        assert not np.allclose(s, 1.0), path  # the outliers give a real scale
        q = layer.kernel.get_value()
        ws = ref.kernel.get_value() * _on_kernel(plan, s)
        step = step_per_element(q)
        e = jnp.maximum(step / 2, jnp.abs(ws) - qmax * step)
        assert float(jnp.max(jnp.abs(q.dequantize(jnp.float32) - ws) - e)) <= 1e-6, path
        xs = inp / _on_kernel(plan, s).reshape(s.shape)  # s on the input's trailing axes
        bound = jnp.einsum(ref.einsum_str, jnp.abs(xs), e)
        slack = 8 * EPS32 * jnp.einsum(ref.einsum_str, jnp.abs(xs), jnp.abs(ws)) + 1e-6
        y, y_float = layer(inp), ref(inp)
        err = jnp.abs(y - y_float)
        assert bool(jnp.all(err <= bound + slack)), (path, float(jnp.max(err - bound - slack)))
        assert float(jnp.max(err)) > 1e-4 * float(jnp.max(jnp.abs(y_float))), path

    save_serving(tmp_path / "nnx", served)
    restored = restore_serving(tmp_path / "nnx", NNXEinsums(nnx.Rngs(5)), x[:2])
    for path in ("up", "down"):
        got = getattr(restored, path).input_scale
        assert isinstance(got, InputScale), path
        np.testing.assert_array_equal(got.get_value(), getattr(served, path).input_scale.get_value())
    np.testing.assert_array_equal(restored(x), served(x))


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


def _stats(batches):
    stats = stats_init(D)
    for (x,) in batches:
        stats = stats_update(stats, x)
    return jax.tree.map(lambda a: a[None], stats)


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
        "n_clip_grid must be a positive int": lambda: AWQConfig(n_clip_grid=0),
        "clip must be None or a bool, got 'yes'": lambda: AWQConfig(clip="yes"),
        "clip=True, gptq=True.*Use clip=None": lambda: AWQConfig(clip=True, gptq=True),
        "Dense_0: ranges are for rounding to nearest": lambda: quantize_layer(
            layer_plans(r.qmodel)["Dense_0"], r.variables["params"]["Dense_0"]["kernel"],
            _stats(r.batches), ranges=(jnp.zeros((2, D)), jnp.ones((2, D)))),
        "alpha must be in": lambda: SmoothQuantConfig(alpha=1.5),
    }
    for match, call in cases.items():
        with pytest.raises(ValueError, match=match) as e:
            call()
        assert "\n" not in str(e.value) and len(str(e.value)) < 500, str(e.value)
