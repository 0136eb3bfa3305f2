"""LSQ QAT (learned weight scales) in the linen layers: step 0 equals plain QAT, both the kernel
and the scale learn, train -> convert -> serve is exact, and bad formats are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.core.dot_config import DotGeneralConfig
from jaxquant.core.dot_general import operand_spec, quantize_operand
from jaxquant.eval import finetune as ft
from jaxquant.nn import (
    QDense,
    QEinsum,
    QuantMode,
    QuantRule,
    Transformer,
    TransformerConfig,
    convert,
)
from jaxquant.nn.linear import init_learned_scales
from jaxquant.nn.modes import LEARNED_SCALE
from jaxquant.ptq import parse_recipe
from jaxquant.train import init_train_state, make_optimizer, make_train_step
from tests.nn.helpers import fwd, random_params

TINY = TransformerConfig.tiny(n_layers=1)  # one block: the compiles are the slow part
# 2 x 24 = 48 rows: more than the tiled decode kernels take (16), so every product of TRAIN,
# plain QAT and SERVE is lax.dot_general of the same dequantized weight: equal bit for bit.
TOKENS = jnp.tile(jnp.arange(24, dtype=jnp.int32) * 7 % 256, (2, 1))
METHOD = "qat:int4:g32"  # full-range int4 grid (qmin -8): the scales start signed


def _layers(params):
    """``{path: layer dict}`` of every layer holding a learned scale."""
    out = {}

    def walk(d, path):
        if LEARNED_SCALE in d:
            out[path] = d
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{path}/{k}" if path else k)

    walk(params, "")
    return out


@pytest.fixture(scope="module")
def setup():
    plain_cfg = ft.parse_method(METHOD).train_config(TINY)
    lsq_cfg = ft.parse_method(METHOD + ":lsq").train_config(TINY)
    params = init_learned_scales(Transformer(lsq_cfg), random_params(TINY))
    return plain_cfg, lsq_cfg, params


def test_core_lsq_on_the_full_range_grid_is_quantize_with_that_scale():
    """lsq_fake_quant uses qmin..qmax when full_range (a signed scale, as RTN's) and its forward is
    quantize(x, spec, scale=s).dequantize() bit for bit."""
    spec = jq.QuantSpec(qtype="int4", channel_axes=(1,), group_size=16, group_axis=0,
                        full_range=True)
    x = jax.random.normal(jax.random.key(3), (64, 8))
    q = jq.quantize(x, spec, pack=False)
    assert np.any(np.asarray(q.scale) < 0) and np.any(np.asarray(q.qvalue) == -8)
    np.testing.assert_array_equal(np.asarray(jq.lsq_fake_quant(x, q.scale, spec)),
                                  np.asarray(q.dequantize()))
    # A smaller step clips: the codes stay in qmin..qmax of the full-range grid.
    y = jq.lsq_fake_quant(x, q.scale / 2, spec)
    want = jq.quantize(x, spec, scale=q.scale / 2, pack=False)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want.dequantize()))
    assert set(np.unique(np.asarray(want.qvalue))) == set(range(-8, 8))


def test_step0_equals_plain_qat(setup):
    plain_cfg, lsq_cfg, params = setup
    layers = _layers(params)
    assert len(layers) == 7  # q, k, v, o, gate, up, down of the one block
    for path, d in layers.items():
        rtn = quantize_operand(d["kernel"], _rule_config(lsq_cfg, path).rhs, (0,), pack=False)
        np.testing.assert_array_equal(np.asarray(d[LEARNED_SCALE]), np.asarray(rtn.scale))
    want = fwd(Transformer(plain_cfg), _strip(params), TOKENS)
    got = fwd(Transformer(lsq_cfg), params, TOKENS)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _rule_config(cfg, path):
    return next(r.config for r in cfg.quant_rules if r.matches(path))


@pytest.fixture(scope="module")
def trained(setup):
    """3 AdamW steps of the LSQ model (no weight decay: a param moves only if it has a
    gradient) and the losses."""
    _, lsq_cfg, params = setup
    model = Transformer(lsq_cfg)
    opt = make_optimizer(learning_rate=3e-3, warmup_steps=1, total_steps=4, weight_decay=0.0)
    state = init_train_state(model, opt, jax.random.key(0), TOKENS, params=params)
    step = make_train_step(model, opt)
    losses = []
    for _ in range(3):
        state, m = step(state, TOKENS)
        losses.append(float(m["loss"]))
    return state.params, losses


def test_kernel_and_scale_both_learn(setup, trained):
    """Adam moves a param by ~lr whatever its gradient's size, and not at all for a zero
    gradient (no weight decay here): every kernel and every scale entry's group moved."""
    _, _, params = setup
    new, losses = trained
    for path, d in _layers(new).items():
        old = _layers(params)[path]
        moved = np.asarray(d[LEARNED_SCALE]) != np.asarray(old[LEARNED_SCALE])
        assert moved.mean() > 0.9, (path, moved.mean())  # LSQ's gradient reaches the scales
        assert not np.array_equal(np.asarray(d["kernel"]), np.asarray(old["kernel"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_weight_decay_skips_the_learned_scales():
    from jaxquant.train.step import _decay_mask

    mask = _decay_mask({"q": {"kernel": jnp.ones((4, 4)), LEARNED_SCALE: jnp.ones((2, 4))},
                        "norm": jnp.ones(4)})
    assert mask == {"q": {"kernel": True, LEARNED_SCALE: False}, "norm": False}


def test_train_convert_serve_is_exact(setup, trained):
    _, lsq_cfg, _ = setup
    trained, _ = trained
    model = Transformer(lsq_cfg)
    serve_params = convert(model, trained)
    assert not _layers(serve_params)  # the scales live in the QArrays only
    for path, d in _layers(trained).items():
        q = _dig(serve_params, path)["kernel"]
        spec = operand_spec(_rule_config(lsq_cfg, path).rhs, 2, (0,))
        np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(d[LEARNED_SCALE]))
        # The codes are round(clip(w / s)) on the full-range grid, what TRAIN multiplied by.
        np.testing.assert_array_equal(
            np.asarray(q.dequantize()),
            np.asarray(jq.lsq_fake_quant(d["kernel"], d[LEARNED_SCALE], spec)))
    train_logits = fwd(model, trained, TOKENS)
    serve_logits = fwd(Transformer(lsq_cfg, mode=QuantMode.SERVE), serve_params, TOKENS)
    # The same dequantized weights in the same lax.dot_general (48 rows): no rounding differs.
    np.testing.assert_array_equal(np.asarray(serve_logits), np.asarray(train_logits))
    # And the learned grid is not RTN's grid of the trained kernels any more.
    rtn = fwd(Transformer(ft.parse_method(METHOD).train_config(TINY)), _strip(trained), TOKENS)
    assert not np.array_equal(np.asarray(rtn), np.asarray(train_logits))


def _dig(d, path):
    for k in path.split("/"):
        d = d[k]
    return d


def _strip(params):
    if not isinstance(params, dict):
        return params
    return {k: _strip(v) for k, v in params.items() if k != LEARNED_SCALE}


def test_rules_json_and_old_rules():
    cfg = parse_recipe("rtn:int4:g32").dot_config
    rule = QuantRule(r"block_\d+/", cfg, learned_scale=True)
    assert QuantRule.from_json(rule.to_json()) == rule
    plain = QuantRule(r"block_\d+/", cfg)
    assert "learned_scale" not in plain.to_dict()  # saved as before LSQ existed
    assert QuantRule.from_dict(plain.to_dict()) == plain and not plain.learned_scale


@pytest.mark.parametrize("rhs,match", [
    (jq.QuantSpec(qtype="nf4", group_size=64), "symmetric int2..int8.*nf4"),
    (jq.QuantSpec(qtype="int4", symmetric=False, group_size=32), r"int4 \(symmetric=False\)"),
    (jq.QuantSpec(qtype="fp8_e4m3"), "fp8_e4m3"),
    (jq.QuantSpec(qtype="int4", fp16_scales=True), "float32 scales"),
    (None, "quantizes the weights"),
])
def test_bad_formats_are_refused_naming_the_rule_and_the_layer(rhs, match):
    cfg = DotGeneralConfig(rhs=rhs) if rhs is not None else None
    with pytest.raises(ValueError, match=rf"rule 'q_proj'.*{match}") as e:
        QuantRule("q_proj", cfg, learned_scale=True)
    assert "\n" not in str(e.value)
    layer = QDense(8, config=cfg, learned_scale=True, name="q_proj")
    x = jnp.ones((2, 64))
    with pytest.raises(ValueError, match=rf"layer q_proj.*{match}"):
        jax.eval_shape(lambda: layer.init(jax.random.key(0), x))
    with pytest.raises(ValueError, match="True or False"):
        QuantRule("q_proj", cfg, learned_scale="yes")


def test_bad_method_strings():
    with pytest.raises(ValueError, match="symmetric int grid.*not nf4"):
        ft.parse_method("qat:nf4:g64:lsq")
    with pytest.raises(ValueError, match="then optionally lsq"):
        ft.parse_method("qat:int4:lsq:g32")
    with pytest.raises(ValueError, match="takes no options"):
        ft.parse_method("qat:w8a8:lsq")
    m = ft.parse_method("qat:int4:g128:lsq")
    assert m == ft.QATMethod(qtype="int4", group_size=128, lsq=True)
    assert ft.parse_method(m.name) == m and m.name == "qat:int4:g128:lsq"
    assert ft.parse_method("qat:int2:lsq").name == "qat:int2:lsq"


def test_two_contracting_axes():
    """A kernel contracting two axes (groups on the inner one; QDenseGeneral shares the code):
    the scale has the QArray's layout, step 0 is plain QAT, and a moved scale still serves
    exactly what TRAIN computes."""

    def make(**kw):
        return QEinsum(shape=(4, 16, 32), einsum_str="bshk,hkd->bsd", **kw)

    cfg = DotGeneralConfig(rhs=jq.QuantSpec(qtype="int3", group_size=8, full_range=True))
    x = jax.random.normal(jax.random.key(5), (2, 12, 4, 16))  # 24 rows: the untiled product
    plain, lsq = make(config=cfg), make(config=cfg, learned_scale=True)
    p = jax.jit(lsq.init)(jax.random.key(0), x)["params"]
    rtn = quantize_operand(p["kernel"], cfg.rhs, lsq.kernel_contracting_axes(), pack=False)
    np.testing.assert_array_equal(np.asarray(p[LEARNED_SCALE]), np.asarray(rtn.scale))
    train = jax.jit(lsq.apply)
    np.testing.assert_array_equal(
        np.asarray(train({"params": p}, x)),
        np.asarray(jax.jit(plain.apply)({"params": {"kernel": p["kernel"]}}, x)))
    moved = {**p, LEARNED_SCALE: p[LEARNED_SCALE] * 0.8}
    serve = convert(lsq, moved, x)
    assert set(serve) == {"kernel"}
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lsq.clone(mode=QuantMode.SERVE).apply)({"params": serve}, x)),
        np.asarray(train({"params": moved}, x)))


def test_a_scale_trained_to_zero_stays_finite():
    cfg = DotGeneralConfig(rhs=jq.QuantSpec(qtype="int4", group_size=16, full_range=True))
    layer = QDense(8, config=cfg, learned_scale=True)
    x = jax.random.normal(jax.random.key(6), (24, 32))
    p = jax.jit(layer.init)(jax.random.key(0), x)["params"]
    p = {**p, LEARNED_SCALE: p[LEARNED_SCALE].at[0, :4].set(0.0)}
    train = jax.jit(layer.apply)
    y = train({"params": p}, x)
    g = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2)))(p)
    assert np.all(np.isfinite(np.asarray(y)))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(g))
    serve = convert(layer, p, x)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(layer.clone(mode=QuantMode.SERVE).apply)({"params": serve}, x)),
        np.asarray(y))
