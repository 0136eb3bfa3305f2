"""The Transformer: param tree, train -> convert -> serve, RoPE layouts, config validation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant.nn as jqn
from jaxquant.core import QArray
from jaxquant.core.dot_config import w8a8, weight_only
from jaxquant.nn import QuantMode, QuantRule, Transformer, TransformerConfig
from tests.nn.helpers import EPS32, fwd, reassociation_tol

TINY = TransformerConfig.tiny()
TOKENS = jax.random.randint(jax.random.key(0), (2, 12), 0, TINY.vocab_size)
QUANT = {"w8a8": w8a8(), "w8": weight_only("int8"), "w4g32": weight_only("int4", 32)}


@pytest.fixture
def params_for(tiny_params, untied_params):
    return lambda cfg: tiny_params if cfg.tie_embeddings else untied_params


def shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


@pytest.mark.parametrize("tied", [True, False])
def test_param_tree_is_exact(tied, params_for):
    cfg = dataclasses.replace(TINY, tie_embeddings=tied)
    d, v, f, hd = cfg.d_model, cfg.vocab_size, cfg.ffn_dim, cfg.head_dim
    h, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    block = {
        "attn_norm": {"scale": (d,)},
        "attn": {
            "q_proj": {"kernel": (d, h)},
            "k_proj": {"kernel": (d, kv)},
            "v_proj": {"kernel": (d, kv)},
            "o_proj": {"kernel": (h, d)},
        },
        "mlp_norm": {"scale": (d,)},
        "mlp": {
            "gate_proj": {"kernel": (d, f)},
            "up_proj": {"kernel": (d, f)},
            "down_proj": {"kernel": (f, d)},
        },
    }
    want = {"embed": {"embedding": (v, d)}, "final_norm": {"scale": (d,)}}
    want.update({f"block_{i}": block for i in range(cfg.n_layers)})
    if not tied:
        want["lm_head"] = {"kernel": (d, v)}
    params = params_for(cfg)
    assert shapes(params) == want
    logits = fwd(Transformer(cfg), params, TOKENS)
    assert logits.shape == (2, 12, v) and logits.dtype == jnp.float32


@pytest.mark.parametrize("name", list(QUANT))
def test_train_convert_serve_equal(name, tiny_params):
    cfg = TINY.with_quantization(QUANT[name])
    model = Transformer(cfg)
    params = tiny_params
    y_train = fwd(model, params, TOKENS)
    serve_params = jqn.convert(model, params)
    serve = Transformer(cfg, mode=QuantMode.SERVE)
    y_serve = fwd(serve, serve_params, TOKENS)
    np.testing.assert_allclose(y_serve, y_train, rtol=0, atol=reassociation_tol(cfg, y_train))
    # The quantized forward really differs from the float one (the test is not vacuous).
    y_float = fwd(Transformer(TINY), params, TOKENS)
    assert float(jnp.max(jnp.abs(y_float - y_train))) > 100 * reassociation_tol(cfg, y_train)


@pytest.mark.parametrize("name", list(QUANT))
def test_converted_params_hold_no_float_kernels(name, tiny_params):
    cfg = TINY.with_quantization(QUANT[name])
    model = Transformer(cfg)
    params = tiny_params
    sp = jqn.convert(model, params)
    flat = jax.tree_util.tree_flatten_with_path(sp, is_leaf=lambda a: isinstance(a, QArray))[0]
    for path, leaf in flat:
        keys = "/".join(p.key for p in path)
        if keys.endswith("kernel"):
            assert isinstance(leaf, QArray), keys
            if name == "w4g32":
                rows, cols = params_at(params, keys).shape
                assert leaf.qvalue.dtype == jnp.uint8 and leaf.qvalue.shape == (rows // 2, cols)
                assert leaf.scale.shape == (rows // 32, cols)
            else:
                assert leaf.qvalue.dtype == jnp.int8
        else:  # embeddings and norm scales stay float (the head rule is None)
            assert not isinstance(leaf, QArray) and leaf.dtype == jnp.float32, keys
    # The generic rule path gives the same kernels as CONVERT mode.
    qp, report = jqn.quantize_params(params, cfg.quant_rules)
    assert len(report.quantized) == 7 * cfg.n_layers
    assert report.unmatched_rules == () and report.matched["embed"] == 1  # kept float by rule 1
    for a, b in zip(jax.tree.leaves(qp), jax.tree.leaves(sp), strict=True):
        np.testing.assert_array_equal(a, b)
    assert jqn.param_bytes(sp) == jqn.serving_param_bytes(cfg)


def params_at(tree, keys):
    for k in keys.split("/"):
        tree = tree[k]
    return tree


@pytest.mark.parametrize("tied", [True, False])
def test_quantized_head_train_equals_serve(tied, params_for):
    cfg = dataclasses.replace(TINY, tie_embeddings=tied).with_quantization(
        weight_only("int4", 32), head=weight_only("int8")
    )
    params = params_for(cfg)
    sp = jqn.convert(Transformer(cfg), params)
    head = sp["embed"]["embedding"] if tied else sp["lm_head"]["kernel"]
    assert isinstance(head, QArray)
    assert isinstance(sp["embed"]["embedding"], QArray)  # the lookup table is quantized too
    y_train = fwd(Transformer(cfg), params, TOKENS)
    y_serve = fwd(Transformer(cfg, mode=QuantMode.SERVE), sp, TOKENS)
    np.testing.assert_allclose(y_serve, y_train, rtol=0, atol=reassociation_tol(cfg, y_train))


def test_static_activation_scales(tiny_params):
    cfg = TINY.with_quantization(w8a8(), static_activation="absmax")
    model = Transformer(cfg)
    params = tiny_params
    stats = jqn.calibrate_model(model, params, [TOKENS[:1], TOKENS[1:]])
    sp = jqn.convert(model, params, quant_stats=stats)
    q = sp["block_0"]["attn"]["q_proj"]
    absmax = max(
        -float(stats["block_0"]["attn"]["q_proj"]["lhs"].min),
        float(stats["block_0"]["attn"]["q_proj"]["lhs"].max),
    )
    assert float(q["lhs_scale"]) == pytest.approx(absmax / 127, rel=1e-6)
    y = fwd(Transformer(cfg, mode=QuantMode.SERVE), sp, TOKENS)
    y_dyn = fwd(model, params, TOKENS)
    # Per-tensor static int8 activations cost accuracy but stay near the dynamic forward.
    assert float(jnp.max(jnp.abs(y - y_dyn))) < 0.1 * float(jnp.max(jnp.abs(y_dyn)))


def test_rope_layouts_agree_under_the_llamacpp_permutation(tiny_params):
    half = dataclasses.replace(TINY, rope_layout="half")
    adj = dataclasses.replace(TINY, rope_layout="adjacent")
    params = tiny_params
    permuted = jax.tree.map(lambda a: a, params)
    for i in range(TINY.n_layers):
        attn = permuted[f"block_{i}"]["attn"]
        attn["q_proj"]["kernel"] = jqn.half_to_adjacent(attn["q_proj"]["kernel"], TINY.n_heads)
        attn["k_proj"]["kernel"] = jqn.half_to_adjacent(attn["k_proj"]["kernel"], TINY.n_kv_heads)
    y_half = fwd(Transformer(half), params, TOKENS)
    y_adj = fwd(Transformer(adj), permuted, TOKENS)
    y_wrong = fwd(Transformer(adj), params, TOKENS)
    tol = 64 * EPS32 * float(jnp.max(jnp.abs(y_half)))  # q.k summed in another order
    np.testing.assert_allclose(y_adj, y_half, rtol=0, atol=tol)
    assert float(jnp.max(jnp.abs(y_wrong - y_half))) > 100 * tol
    k = params["block_0"]["attn"]["k_proj"]["kernel"]
    np.testing.assert_array_equal(jqn.adjacent_to_half(jqn.half_to_adjacent(k, 2), 2), k)


def test_rope_half_matches_hf_reference():
    x = np.asarray(jax.random.normal(jax.random.key(2), (1, 5, 2, 8)), np.float64)
    pos = np.arange(5)
    inv = 1.0 / 1e4 ** (np.arange(0, 8, 2) / 8)
    emb = np.concatenate([pos[:, None] * inv] * 2, axis=-1)[None, :, None, :]
    rotate_half = np.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
    ref = x * np.cos(emb) + rotate_half * np.sin(emb)
    y = jqn.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), 1e4, "half")
    np.testing.assert_allclose(y, ref, atol=1e-5)
    # The adjacent layout is the half layout in the interleaved coordinate order.
    perm = np.stack([np.arange(4), np.arange(4) + 4], -1).reshape(-1)
    ya = jqn.apply_rope(jnp.asarray(x[..., perm], jnp.float32), jnp.asarray(pos), 1e4, "adjacent")
    np.testing.assert_allclose(ya, ref[..., perm], atol=1e-5)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(n_heads=4, n_kv_heads=3), "divisible"),
        (dict(rope_layout="interleaved"), "rope_layout"),
        (dict(head_dim=15), "even"),
        (dict(d_model=0), "positive"),
        (dict(kv_cache_qtype="int2"), "kv_cache_qtype"),
        (dict(kv_cache_qtype="fp9"), "qtype"),
        (dict(dtype="int8"), "dtype"),
        (dict(rms_eps=0.0), "rms_eps"),
        (dict(quant_rules=("block",)), "QuantRule"),
        (dict(tie_embeddings=1), "bool"),
    ],
)
def test_bad_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig.tiny(**overrides)


def test_config_from_dict_and_presets(tiny_params):
    d = {f.name: getattr(TINY, f.name) for f in dataclasses.fields(TINY)}
    assert TransformerConfig.from_dict(d) == TINY
    with pytest.raises(ValueError, match="Unknown"):
        TransformerConfig.from_dict({**d, "n_head": 3})
    s = TransformerConfig.smollm2_135m()
    assert (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_dim) == (
        30,
        576,
        9,
        3,
        64,
        1536,
    )
    assert (s.vocab_size, s.tie_embeddings, s.rope_layout, s.max_seq_len) == (
        49152,
        True,
        "adjacent",
        2048,
    )
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(TINY).apply(
            {"params": tiny_params}, jnp.zeros((1, TINY.max_seq_len + 1), jnp.int32)
        )


def test_serving_bytes_match_the_formula():
    """int8 per-channel: 1 byte per weight + one f32 scale per output column; int4 g32: half a
    byte per weight + one f32 scale per 32 inputs per column. Float leaves at 4 bytes."""
    cfg = TINY
    kernels = [
        (cfg.d_model, cfg.q_dim),
        (cfg.d_model, cfg.kv_dim),
        (cfg.d_model, cfg.kv_dim),
        (cfg.q_dim, cfg.d_model),
        (cfg.d_model, cfg.ffn_dim),
        (cfg.d_model, cfg.ffn_dim),
        (cfg.ffn_dim, cfg.d_model),
    ] * cfg.n_layers
    floats = 4 * (cfg.vocab_size * cfg.d_model + (2 * cfg.n_layers + 1) * cfg.d_model)
    f32 = floats + sum(4 * i * o for i, o in kernels)
    i8 = floats + sum(i * o + 4 * o for i, o in kernels)
    i4 = floats + sum(i * o // 2 + 4 * (i // 32) * o for i, o in kernels)
    assert jqn.serving_param_bytes(cfg) == f32
    assert jqn.serving_param_bytes(cfg.with_quantization(weight_only("int8"))) == i8
    assert jqn.serving_param_bytes(cfg.with_quantization(w8a8())) == i8
    assert jqn.serving_param_bytes(cfg.with_quantization(weight_only("int4", 32))) == i4


def test_first_matching_rule_wins_and_a_none_rule_keeps_float(tiny_params):
    """Rules match module paths and the first match wins: a None rule ahead of a catch-all keeps
    that one projection float in the serving params, and SERVE runs the mixed tree as TRAIN does.
    (The public names of ``jaxquant.nn`` are snapshotted in tests/test_public_api.py.)"""
    rules = (
        QuantRule(r"^block_0/attn/q_proj$", None),
        QuantRule(r"(^|/)block_\d+/(attn|mlp)/", weight_only("int4", 32)),
    )
    cfg = dataclasses.replace(TINY, quant_rules=rules)
    sp = jqn.convert(Transformer(cfg), tiny_params)
    kernel = lambda b, mod, lin: sp[f"block_{b}"][mod][lin]["kernel"]
    assert not isinstance(kernel(0, "attn", "q_proj"), QArray)
    np.testing.assert_array_equal(
        kernel(0, "attn", "q_proj"), tiny_params["block_0"]["attn"]["q_proj"]["kernel"]
    )
    for b, mod, lin in [(0, "attn", "k_proj"), (1, "attn", "q_proj"), (0, "mlp", "down_proj")]:
        assert isinstance(kernel(b, mod, lin), QArray), (b, mod, lin)
    y_train = fwd(Transformer(cfg), tiny_params, TOKENS)
    y_serve = fwd(Transformer(cfg, mode=QuantMode.SERVE), sp, TOKENS)
    np.testing.assert_allclose(y_serve, y_train, rtol=0, atol=reassociation_tol(cfg, y_train))


def test_bf16_compute_train_equals_serve(tiny_params):
    """With a bf16 compute dtype, TRAIN quantizes the bf16-cast kernel and CONVERT stores exactly
    that, so SERVE still matches (to bf16 reassociation)."""
    cfg = TransformerConfig.tiny(dtype="bfloat16").with_quantization(
        w8a8(), head=weight_only("int8")
    )
    y_train = fwd(Transformer(cfg), tiny_params, TOKENS)
    sp = jqn.convert(Transformer(cfg), tiny_params)
    assert sp["block_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    y_serve = fwd(Transformer(cfg, mode=QuantMode.SERVE), sp, TOKENS)
    assert y_serve.dtype == jnp.float32
    np.testing.assert_allclose(y_serve, y_train, rtol=0, atol=reassociation_tol(cfg, y_train))
