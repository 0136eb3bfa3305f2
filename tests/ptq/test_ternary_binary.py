"""Ternary and binary weights through RTN, GPTQ and QAT on the tiny Transformer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
import jaxquant.nn as jqn
from jaxquant.core import QArray, QuantSpec, get_qtype, quantize_operand
from jaxquant.nn import QuantMode, Transformer, TransformerConfig
from jaxquant.ptq.gptq import gptq_quantize
from jaxquant.ptq.hessian import hessian, stats_init, stats_update
from jaxquant.ptq.pipeline import quantize_model
from jaxquant.ptq.recipe import parse_recipe
from tests.nn.helpers import fwd, random_params, reassociation_tol

TINY = TransformerConfig.tiny()
_per_byte = lambda qtype: get_qtype(qtype).codes_per_byte
LINEARS = (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
           ("mlp", ("gate_proj", "up_proj", "down_proj")))


def _correlated(d_in=128, d_out=32, n=512, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    mix = jax.random.normal(k[0], (d_in, d_in)) / np.sqrt(d_in)
    x = jax.random.normal(k[1], (n, d_in)) @ mix + 0.05 * jax.random.normal(k[2], (n, d_in))
    x = x * jnp.exp(0.5 * jax.random.normal(k[3], (d_in,)))
    w = jax.random.normal(k[2], (d_in, d_out)) / np.sqrt(d_in)
    return x, w


@pytest.mark.parametrize("recipe", ["rtn:ternary:g64", "gptq:ternary:g64", "rtn:binary:g64",
                                    "gptq:binary:g64"])
def test_recipes_parse_round_trip_and_use_absmean(recipe):
    r = parse_recipe(recipe)
    assert r.name == recipe and parse_recipe(r.name) == r and not r.full_range
    rhs = r.dot_config.rhs
    assert rhs.qtype == recipe.split(":")[1] and rhs.calibration == "absmean"
    assert rhs.group_size == 64 and not rhs.full_range


@pytest.mark.slow  # 20-45 s on 2 cores; CI runs it in its slow pass
@pytest.mark.parametrize("qtype", ["ternary", "binary"])
def test_gptq_uses_absmean_group_scales_and_beats_rtn(qtype):
    x, w = _correlated()
    spec = QuantSpec(qtype=qtype, group_size=32)
    q, _ = gptq_quantize(w, hessian(stats_update(stats_init(x.shape[1]), x)), spec)
    rtn = quantize_operand(w, spec, (0,))
    assert q.qtype == qtype and q.qvalue.shape == rtn.qvalue.shape
    # act-order GPTQ fixes each group's scale from the original weights: mean |w| per group
    want = np.abs(np.asarray(w)).reshape(4, 32, -1).mean(axis=1)
    np.testing.assert_allclose(np.asarray(q.scale), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rtn.scale), want, rtol=1e-6)
    levels = {-1, 0, 1} if qtype == "ternary" else {-1, 1}
    assert set(np.unique(np.asarray(q.codes()))) <= levels
    err = lambda qq: float(jnp.mean((x @ qq.dequantize() - x @ w) ** 2))
    assert err(q) < 0.9 * err(rtn)


@pytest.fixture(scope="module")
def tiny():
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, TINY.vocab_size)
    params = random_params(TINY)
    return params, np.asarray(tokens), fwd(Transformer(TINY), params, tokens)


# The binary rows repeat the ternary ones' code paths; they run with the slow tests.
BOTH = ["ternary", pytest.param("binary", marks=pytest.mark.slow)]


@pytest.mark.slow  # whole-model GPTQ; the layer-level GPTQ test above runs by default
@pytest.mark.parametrize("qtype", ["ternary", "binary"])
def test_rtn_and_gptq_models_serve_packed_and_gptq_wins(tiny, qtype):
    params, tokens, ref = tiny
    errs = {}
    for method in ("rtn", "gptq"):
        scfg, sp, _ = quantize_model(TINY, params, parse_recipe(f"{method}:{qtype}:g32"), tokens,
                                     progress=False)
        for i in range(TINY.n_layers):
            for mod, lins in LINEARS:
                for lin in lins:
                    k = sp[f"block_{i}"][mod][lin]["kernel"]
                    assert isinstance(k, QArray) and k.qtype == qtype
                    assert k.qvalue.dtype == jnp.uint8  # packed, 4 or 8 per byte
                    assert k.qvalue.size * _per_byte(qtype) == np.prod(k.shape)
        out = fwd(Transformer(scfg, mode=QuantMode.SERVE), sp, tokens)
        assert np.all(np.isfinite(out))
        errs[method] = float(jnp.mean((out - ref) ** 2))
    assert errs["gptq"] < errs["rtn"]


@pytest.mark.parametrize("qtype", BOTH)
def test_qat_train_convert_serve_equal(tiny, qtype):
    # The QAT rule the finetune command uses: weight_only(qtype, group_size) in TRAIN mode.
    params, tokens, y_float = tiny
    cfg = TINY.with_quantization(jq.weight_only(qtype, group_size=32))
    model = Transformer(cfg)
    y_train = fwd(model, params, tokens)
    sp = jqn.convert(model, params)
    kernels = [sp["block_0"][m][lin]["kernel"] for m, lins in LINEARS for lin in lins]
    assert all(isinstance(k, QArray) and k.qtype == qtype for k in kernels)
    y_serve = fwd(Transformer(cfg, mode=QuantMode.SERVE), sp, tokens)
    tol = reassociation_tol(cfg, y_train)
    np.testing.assert_allclose(y_serve, y_train, rtol=0, atol=tol)
    assert float(jnp.max(jnp.abs(y_float - y_train))) > 100 * tol  # really quantized
    # Serving bytes: the packed kernels are 4x (ternary) / 8x (binary) below int8 codes.
    n = sum(int(np.prod(k.shape)) for k in kernels)
    assert sum(k.qvalue.size for k in kernels) * _per_byte(qtype) == n

    # QAT trains: the straight-through gradient reaches every float kernel.
    def loss(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    g = jax.jit(jax.grad(loss))(params)
    gk = g["block_0"]["mlp"]["down_proj"]["kernel"]
    assert np.all(np.isfinite(gk)) and float(jnp.max(jnp.abs(gk))) > 0


def test_qat_rule_spec_is_the_serving_spec():
    cfg = jq.weight_only("ternary", group_size=64)
    assert cfg.rhs == parse_recipe("rtn:ternary:g64").dot_config.rhs
