"""The full-range symmetric int grid in PTQ recipes: grammar, default, numerics, sidecar."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.core import QuantSpec, quantize_operand
from jaxquant.nn import TransformerConfig
from jaxquant.ptq.gptq import gptq_quantize
from jaxquant.ptq.hessian import hessian, stats_init, stats_update
from jaxquant.ptq.recipe import FULL_RANGE_DEFAULT, Recipe, parse_recipe


@pytest.mark.parametrize("text,full", [
    ("rtn:int4:g128:full", True), ("rtn:int4:g128:narrow", False),
    ("gptq:int3:g128:full", True), ("awq:int4:g128:narrow", False),
    ("rtn:int8:narrow:mse", False), ("rtn:int2:g64:full:mse", True),
    ("rtn:int4:g128", FULL_RANGE_DEFAULT), ("gptq:int3:g128", FULL_RANGE_DEFAULT),
    ("rtn:int4:g32:asym", False), ("rtn:nf4:g64", False), ("rtn:ternary:g64", False),
    ("rtn:q4_0", True), ("rtn:q8_0", False), ("w8a8", False), ("fp32", False),
])
def test_grid_tokens_parse_and_round_trip(text, full):
    r = parse_recipe(text)
    assert r.full_range is full
    assert parse_recipe(r.name) == r
    assert r.name == parse_recipe(r.name).name
    # the default grid is left out of the name; the other one is spelled
    assert (":full" in r.name) == (full and not FULL_RANGE_DEFAULT and r.grid is None)
    assert (":narrow" in r.name) == (not full and FULL_RANGE_DEFAULT and r.symmetric
                                     and r.qtype.startswith("int") and r.grid is None
                                     and r.method not in ("w8a8", "fp32"))
    rhs = None if r.dot_config is None else r.dot_config.rhs
    if rhs is not None:
        assert rhs.full_range is full


def test_default_is_only_for_symmetric_int_weights():
    assert Recipe(method="rtn", qtype="int4", group_size=128).full_range is FULL_RANGE_DEFAULT
    assert Recipe(method="rtn", qtype="int4", symmetric=False).full_range is False
    # the QuantSpec default (documented in API.md) is unchanged
    assert QuantSpec(qtype="int4").full_range is False


@pytest.mark.parametrize("text,match", [
    ("rtn:int4:asym:full", "asym"), ("rtn:int4:g32:narrow:asym", "asym"),
    ("rtn:ternary:g64:full", "full_range"), ("rtn:nf4:full", "full_range"),
    ("rtn:q4_0:narrow", "q4_0"), ("w8a8:full", "no options"),
])
def test_bad_grid_tokens(text, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe(text)
    with pytest.raises(ValueError, match="full_range"):
        Recipe(method="rtn", grid="q4_0", full_range=False)


def _w(d_in=256, d_out=64, seed=0):
    return jax.random.normal(jax.random.key(seed), (d_in, d_out)) / 16


@pytest.mark.parametrize("qtype", ["int4", "int3"])
def test_full_grid_uses_every_code_with_a_finer_step(qtype):
    w = _w()
    full = quantize_operand(w, parse_recipe(f"rtn:{qtype}:g64:full").dot_config.rhs, (0,))
    narrow = quantize_operand(w, parse_recipe(f"rtn:{qtype}:g64:narrow").dot_config.rhs, (0,))
    bits = int(qtype[3:])
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    cf, cn = np.asarray(full.codes()), np.asarray(narrow.codes())
    assert cf.min() == qmin and cf.max() == qmax
    assert cn.min() == -qmax and cn.max() == qmax
    # step: |signed extreme| / 2**(N-1) against absmax / qmax
    amax = np.abs(np.asarray(w)).reshape(4, 64, -1).max(axis=1)
    np.testing.assert_allclose(np.abs(np.asarray(full.scale)), amax / -qmin, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(narrow.scale), amax / qmax, rtol=1e-6)
    # within half a step on the grid (the extreme lands on qmin exactly); the mirror side is
    # clipped at qmax: at most one step off there
    sf = np.repeat(np.asarray(full.scale), 64, axis=0)
    v = np.asarray(w) / sf
    err = np.abs(np.asarray(full.dequantize()) - np.asarray(w))
    on_grid = v <= qmax + 0.5
    assert np.all(err[on_grid] <= 0.5 * np.abs(sf[on_grid]) * (1 + 1e-6))
    assert np.all(err <= np.abs(sf) * (1 + 1e-6))
    # and with the finer step, the squared error is lower on Gaussian weights
    mse = lambda q: float(jnp.mean((q.dequantize() - w) ** 2))
    assert mse(full) < mse(narrow)


def test_gptq_on_the_full_grid():
    k = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(k[0], (512, 128)) @ (jax.random.normal(k[1], (128, 128)) / 12)
    w = _w(128, 32)
    spec = parse_recipe("gptq:int4:g32:full").dot_config.rhs
    q, _ = gptq_quantize(w, hessian(stats_update(stats_init(128), x)), spec)
    assert np.asarray(q.codes()).min() == -8
    rtn = quantize_operand(w, spec, (0,))
    np.testing.assert_array_equal(q.scale, rtn.scale)  # act-order: scales from the weights
    err = lambda qq: float(jnp.mean((x @ qq.dequantize() - x @ w) ** 2))
    assert err(q) < err(rtn)


@pytest.mark.parametrize("text", ["rtn:int4:g32:narrow", "rtn:int4:g32:full"])
def test_recipe_round_trips_through_the_checkpoint_sidecar(tmp_path, text):
    from jaxquant.models.saved import load_quantized, save_quantized
    from jaxquant.nn import Transformer
    from jaxquant.ptq.pipeline import quantize_model

    cfg = TransformerConfig.tiny()
    params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    recipe = parse_recipe(text)
    scfg, sp, _ = quantize_model(cfg, params, recipe, None, progress=False)
    save_quantized(tmp_path / "q", scfg, sp, {"recipe": recipe.name})
    cfg2, sp2, side = load_quantized(tmp_path / "q")
    assert parse_recipe(side["recipe"]) == recipe
    assert cfg2 == scfg
    rhs = [r.config.rhs for r in cfg2.quant_rules if r.config is not None]
    assert rhs and all(s.full_range is recipe.full_range for s in rhs)
    k, k2 = sp["block_0"]["attn"]["q_proj"]["kernel"], sp2["block_0"]["attn"]["q_proj"]["kernel"]
    jax.tree.map(np.testing.assert_array_equal, k, k2)
    assert bool(np.asarray(k.codes()).min() == -8) is recipe.full_range


def test_weight_only_takes_the_full_grid():
    """``jq.weight_only(..., full_range=True)`` is the recipes' default grid: the same spec as
    ``rtn:int4:g128``, with code -8 in use; the layer API's default stays -7..7."""
    import jaxquant as jq

    cfg = jq.weight_only("int4", group_size=128, full_range=True)
    assert cfg.rhs == parse_recipe("rtn:int4:g128").dot_config.rhs
    w = jax.random.normal(jax.random.key(0), (256, 8))
    full = np.asarray(quantize_operand(w, cfg.rhs, (0,)).codes())
    narrow = np.asarray(quantize_operand(w, jq.weight_only("int4", group_size=128).rhs,
                                         (0,)).codes())
    assert full.min() == -8 and full.max() <= 7
    assert narrow.min() >= -7 and narrow.max() <= 7
    with pytest.raises(ValueError, match="full_range"):
        jq.weight_only("nf4", full_range=True)
