"""Model-level PTQ on the tiny transformer: serving params, sequential GPTQ, SmoothQuant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.core import QArray
from jaxquant.nn import QuantMode, Transformer, TransformerConfig
from jaxquant.ptq.pipeline import PTQOptions, effective_group, quantize_model
from jaxquant.ptq.recipe import parse_recipe


@pytest.fixture(scope="module")
def tiny():
    cfg = TransformerConfig.tiny()
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 256)
    params = Transformer(cfg).init(jax.random.key(0), tokens[:1])["params"]
    ref = Transformer(cfg).apply({"params": params}, tokens)
    return cfg, params, np.asarray(tokens), ref


_CACHE = {}


def _run(tiny, recipe):
    if recipe in _CACHE:
        return _CACHE[recipe]
    cfg, params, tokens, ref = tiny
    scfg, sp, info = quantize_model(cfg, params, parse_recipe(recipe), tokens, progress=False)
    out = Transformer(scfg, mode=QuantMode.SERVE).apply({"params": sp}, tokens)
    _CACHE[recipe] = sp, float(jnp.mean((out - ref) ** 2)), info
    return _CACHE[recipe]


@pytest.mark.parametrize("recipe", ["rtn:int3:g32", "gptq:int3:g32", "awq:int4:g32",
                                    "smoothquant"])
def test_serving_params_hold_qarray_kernels_only(tiny, recipe):
    sp, _, info = _run(tiny, recipe)
    # Each kernel carries the group size info reports (g32 divides the tiny model's widths);
    # SmoothQuant's W8A8 has per-channel scales and no groups.
    groups = info.get("group_sizes")
    assert (groups is None) == (recipe == "smoothquant")
    assert groups is None or set(groups.values()) == {32}
    for i in range(tiny[0].n_layers):
        block = sp[f"block_{i}"]
        for mod, lins in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                          ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for lin in lins:
                k = block[mod][lin]["kernel"]
                assert isinstance(k, QArray), (recipe, lin)
                assert k.qvalue.dtype in (jnp.int8, jnp.uint8)
                assert k.group_size == (None if groups is None else groups[f"{mod}/{lin}"])


def test_int8_activation_recipe_serves_integer_products(tiny):
    """``:a8`` keeps RTN's weights bit for bit, serves them with int8 activations (the jaxpr
    has int8 x int8 -> int32 dots), and adds only the activation rounding to the error: an int8
    step is 1/16 of an int4 one relative to the range, so the MSE may grow by a few percent,
    where a wrong product (float activations silently, or a mis-scaled sum) would not match."""
    cfg, _, tokens, ref = tiny
    sp_wo, e_wo, _ = _run(tiny, "rtn:int4:g32")
    sp_a8, e_a8, _ = _run(tiny, "rtn:int4:g32:a8")
    for a, b in zip(jax.tree.leaves(sp_wo), jax.tree.leaves(sp_a8), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    scfg = quantize_model(cfg, tiny[1], parse_recipe("rtn:int4:g32:a8"), None,
                          progress=False)[0]
    model = Transformer(scfg, mode=QuantMode.SERVE)
    jaxpr = str(jax.make_jaxpr(lambda p, t: model.apply({"params": p}, t))(sp_a8, tokens[:1, :1]))
    assert "preferred_element_type=int32" in jaxpr
    assert e_wo < e_a8 < 1.25 * e_wo


def test_gptq_model_error_below_rtn(tiny):
    _, e_rtn, _ = _run(tiny, "rtn:int3:g32")
    _, e_gptq, _ = _run(tiny, "gptq:int3:g32")
    assert e_gptq < e_rtn


def test_true_sequential_recalibrates_only_the_later_linears(tiny):
    cfg, params, tokens, _ = tiny
    recipe = parse_recipe("gptq:int3:g32")
    _, seq, _ = quantize_model(cfg, params, recipe, tokens, progress=False,
                               options=PTQOptions(true_sequential=True))
    _, one, _ = quantize_model(cfg, params, recipe, tokens, progress=False,
                               options=PTQOptions(true_sequential=False))
    codes = lambda sp, mod, lin: np.asarray(sp["block_0"][mod][lin]["kernel"].qvalue)
    # q/k/v see the same float block inputs either way ...
    for lin in ("q_proj", "k_proj", "v_proj"):
        np.testing.assert_array_equal(codes(seq, "attn", lin), codes(one, "attn", lin))
    # ... while o_proj and the MLP are calibrated on inputs of the quantized q/k/v.
    assert (codes(seq, "attn", "o_proj") != codes(one, "attn", "o_proj")).any()
    assert (codes(seq, "mlp", "down_proj") != codes(one, "mlp", "down_proj")).any()


def test_smoothquant_w8a8_close_to_float(tiny):
    # int8 per-token x per-channel: the logit error is a small fraction of the logit spread.
    _, err, _ = _run(tiny, "smoothquant")
    ref = tiny[3]
    assert err < 1e-3 * float(jnp.var(ref))


def test_calibration_methods_need_data(tiny):
    cfg, params, _, _ = tiny
    with pytest.raises(ValueError, match="calibration data"):
        quantize_model(cfg, params, parse_recipe("gptq:int4:g32"), None, progress=False)


def test_effective_group():
    assert effective_group(1536, 128) == 128
    assert effective_group(576, 128) == 96
    assert effective_group(576, None) is None
