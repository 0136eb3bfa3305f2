"""jaxquant's own Transformer through the any-model path (``jq.quantize_model`` +
``to_serving`` / ``jq.calibrate_and_convert``): its ``QDense`` layers are matched like stock
ones, and the results are the block driver's (``jaxquant.ptq.quantize_model``) bit for bit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.core import QArray
from jaxquant.nn import QDenseGeneral, QEinsum, QuantMode, Transformer, TransformerConfig
from jaxquant.nn.any_model import restore_serving, save_serving, to_serving
from jaxquant.ptq import AWQConfig, PTQOptions, parse_recipe
from jaxquant.ptq.pipeline import quantize_model as block_driver

CFG = TransformerConfig.tiny()
LINEARS = r"(^|/)block_\d+/(attn|mlp)/\w+_proj$"


@pytest.fixture(scope="module")
def setup():
    model = Transformer(CFG)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda p: p * 4.0 if p.ndim == 2 else p, params)
    calib = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 32))
    batches = [(jnp.asarray(calib[i : i + 4]),) for i in (0, 4)]
    return model, {"params": params}, calib, batches


def _kernels(tree, block="block_1"):
    return {f"{m}/{lin}": tree[block][m][lin]["kernel"] for m in ("attn", "mlp")
            for lin in tree[block][m]}


def _same(a: QArray, b: QArray):
    np.testing.assert_array_equal(np.asarray(a.qvalue), np.asarray(b.qvalue))
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))


def test_transformer_qat_and_rtn_serving_equal_the_block_driver(setup):
    model, v, calib, _ = setup
    recipe = parse_recipe("rtn:int4:g32")
    qmodel = jq.quantize_model(model, [jq.QuantRule(LINEARS, recipe.dot_config)], calib[:1])
    serve_cfg, want, _ = block_driver(CFG, v["params"], recipe, progress=False)
    x = jnp.asarray(calib[:2])
    # QAT forward: the Transformer built with the same rules, in TRAIN mode
    np.testing.assert_array_equal(np.asarray(qmodel.apply(v, x)),
                                  np.asarray(Transformer(serve_cfg).apply(v, x)))
    serving = to_serving(qmodel, v)
    for path, k in _kernels(serving["params"]).items():
        assert isinstance(k, QArray) and k.group_size == 32, path
        _same(k, _kernels(want)[path])
    np.testing.assert_array_equal(
        np.asarray(qmodel.apply(serving, x)),
        np.asarray(Transformer(serve_cfg, QuantMode.SERVE).apply({"params": want}, x)))


def test_transformer_gptq_by_blocks_equals_the_block_driver(setup):
    """``blocks=r"block_\\d+"``: each block on inputs through the earlier quantized blocks, all
    its linears from one pass: the driver with ``true_sequential=False``."""
    model, v, calib, batches = setup
    recipe = parse_recipe("gptq:int4:g32")
    qmodel = jq.quantize_model(model, [jq.QuantRule(LINEARS, recipe.dot_config)], calib[:1])
    got = jq.calibrate_and_convert(qmodel, v, batches, blocks=r"block_\d+")
    _, want, _ = block_driver(CFG, v["params"], recipe, calib,
                              options=PTQOptions(true_sequential=False, batch_windows=4),
                              progress=False)
    for block in ("block_0", "block_1"):
        for path, k in _kernels(got["params"], block).items():
            _same(k, _kernels(want, block)[path])


def test_transformer_awq_keeps_input_scales_and_round_trips(setup, tmp_path):
    """AWQ on the any-model path: each QDense keeps ``s`` and serves ``(x / s) . Q(W s)``:
    exactly the float Transformer with kernels ``Q(W s) / s``; saved and restored bit for bit."""
    model, v, calib, batches = setup
    rules = [jq.QuantRule(LINEARS, parse_recipe("rtn:int4:g32").dot_config)]
    qmodel = jq.quantize_model(model, rules, calib[:1])
    served = jq.calibrate_and_convert(qmodel, v, batches, method=AWQConfig(alpha=0.5,
                                                                            clip=False))
    layer = served["params"]["block_0"]["attn"]["q_proj"]
    assert layer["input_scale"].shape == (CFG.d_model,)
    assert not np.allclose(np.asarray(layer["input_scale"]), 1.0)
    equivalent = jax.tree.map(lambda a: a, v["params"])
    for block in ("block_0", "block_1"):
        for m in ("attn", "mlp"):
            for lin, p in served["params"][block][m].items():
                w = p["kernel"].dequantize(jnp.float32) / p["input_scale"][:, None]
                equivalent[block][m][lin] = {"kernel": w}
    x = jnp.asarray(calib[:2])
    y = qmodel.apply(served, x)
    ref = model.apply({"params": equivalent}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=0, atol=1e-4)
    save_serving(tmp_path / "awq", qmodel, served)
    qmodel2, restored = restore_serving(tmp_path / "awq", model, calib[:1])
    np.testing.assert_array_equal(np.asarray(qmodel2.apply(restored, x)), np.asarray(y))


def test_a_jaxquant_layer_already_quantized_is_named(setup):
    model, _, calib, _ = setup
    quantized = Transformer(CFG.with_quantization(jq.w8a8()))
    with pytest.raises(ValueError, match="block_0/attn/q_proj: this QDense is already quantized"):
        jq.quantize_model(quantized, [jq.QuantRule(LINEARS, jq.w8a8())], calib[:1])
    with pytest.raises(ValueError, match="mode SERVE"):
        jq.quantize_model(model.clone(mode=QuantMode.SERVE),
                          [jq.QuantRule(LINEARS, jq.weight_only("int4"))], calib[:1])


@pytest.mark.parametrize("layer", [
    QDenseGeneral(features=(2, 8), axis=(-2, -1)),
    QEinsum(shape=(4, 16, 6), einsum_str="bhk,hkf->bf"),
])
def test_jaxquant_general_layers_train_convert_serve(layer):
    """QDenseGeneral over two axes and QEinsum: TRAIN = the layer built with the config, and
    the served layer equals its CONVERT / SERVE pair."""
    x = jax.random.normal(jax.random.key(1), (3, 4, 16))
    cfg = jq.weight_only("int8")
    qlayer = jq.quantize_model(layer, [jq.QuantRule(".*", cfg)], x)
    v = layer.init(jax.random.key(0), x)
    built = dataclasses.replace(layer, config=cfg)
    np.testing.assert_array_equal(np.asarray(qlayer.apply(v, x)), np.asarray(built.apply(v, x)))
    serving = to_serving(qlayer, v)
    assert isinstance(serving["params"]["kernel"], QArray)
    served = dataclasses.replace(built, mode=QuantMode.SERVE)
    np.testing.assert_array_equal(np.asarray(qlayer.apply(serving, x)),
                                  np.asarray(served.apply(serving, x)))


@pytest.mark.parametrize("layer", [
    QDenseGeneral(features=(2, 8), axis=(-2, -1)),
    QEinsum(shape=(4, 16, 6), einsum_str="bhk,hkf->bf"),
])
def test_jaxquant_general_layers_with_an_input_scale(layer):
    """AWQ on a layer contracting two input axes: the served layer is exactly the float layer
    with kernel ``Q(W s) / s`` (``s [4, 16]`` along the contracted axes)."""
    x = jax.random.normal(jax.random.key(1), (3, 4, 16)) * jnp.linspace(0.2, 3.0, 16)
    qlayer = jq.quantize_model(layer, [jq.QuantRule(".*", jq.weight_only("int4"))], x)
    v = layer.init(jax.random.key(0), x)
    batches = [(jax.random.normal(jax.random.key(i), (8, 4, 16)) * jnp.linspace(0.2, 3.0, 16),)
               for i in (2, 3)]
    served = jq.calibrate_and_convert(qlayer, v, batches, method=AWQConfig(alpha=0.5,
                                                                            clip=False))
    s = served["params"]["input_scale"]
    assert s.shape == (4, 16) and not np.allclose(np.asarray(s), 1.0)
    q = served["params"]["kernel"]
    w = q.dequantize(jnp.float32) / s.reshape(s.shape + (1,) * (q.ndim - 2))
    np.testing.assert_allclose(np.asarray(qlayer.apply(served, x)),
                               np.asarray(layer.apply({"params": {"kernel": w}}, x)),
                               rtol=1e-5, atol=1e-5)
