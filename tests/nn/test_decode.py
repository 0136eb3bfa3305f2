"""KV-cache decoding against the full forward pass; sampling; cache sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant.nn as jqn
from jaxquant.core import QuantSpec
from jaxquant.core.dot_config import DotGeneralConfig, w8a8
from jaxquant.nn import QuantMode, Transformer, TransformerConfig
from tests.nn.helpers import EPS32, fwd, reassociation_tol
from tests.nn.test_linear import iter_eqns

TINY = TransformerConfig.tiny()
SEQ = jax.random.randint(jax.random.key(5), (2, 10), 0, TINY.vocab_size)
PROMPT = 6


def full_forward(model, params, tokens):
    return fwd(model, params, tokens)


def decode_logits(model, params, tokens, qtype, prompt=PROMPT):
    """Prefill ``prompt`` tokens, then feed the rest one at a time; logits of every position."""
    cache = jqn.init_kv_cache(model.cfg, tokens.shape[0], 16, qtype=qtype)
    logits, cache = jqn.prefill(model, params, tokens[:, :prompt], cache)
    out = [logits]
    for t in range(prompt, tokens.shape[1]):
        logits, cache = jqn.decode_step(model, params, tokens[:, t : t + 1], cache)
        out.append(logits)
    return jnp.concatenate(out, axis=1), cache


# Causal attention quantization: int8 scores (Q and K per token), int8 probabilities, float V.
ATTN_INT8 = dict(
    attn_qk_config=w8a8(), attn_pv_config=DotGeneralConfig(lhs=QuantSpec(qtype="int8"))
)


@pytest.mark.parametrize("variant", ["float", "w8a8-serve", "int8-attention"])
def test_float_cache_decoding_equals_full_forward(variant, tiny_params):
    model, params = Transformer(TINY), tiny_params
    if variant == "w8a8-serve":  # SERVE mode with converted w8a8 params decodes the same way
        cfg = TINY.with_quantization(w8a8())
        params = jqn.convert(Transformer(cfg), params)
        model = Transformer(cfg, mode=QuantMode.SERVE)
    elif variant == "int8-attention":
        model = Transformer(TransformerConfig.tiny(**ATTN_INT8))
        jaxpr = jax.make_jaxpr(model.apply)({"params": params}, SEQ)
        int_dots = [
            e
            for e in iter_eqns(jaxpr.jaxpr)
            if e.primitive.name == "dot_general" and all(v.aval.dtype == jnp.int8 for v in e.invars)
        ]
        assert len(int_dots) == TINY.n_layers  # QK^T is int8 x int8; PV has a float V
    full = full_forward(model, params, SEQ)
    dec, cache = decode_logits(model, params, SEQ, None)
    assert int(cache.length) == SEQ.shape[1]
    np.testing.assert_allclose(dec, full, rtol=0, atol=reassociation_tol(model.cfg, full))


@pytest.fixture(scope="module")
def kv_jacobian(tiny_params):
    """The float K/V of one sequence and the Jacobian of its logits w.r.t. them (the post-RoPE
    keys and the values, through flax perturbations in the attention)."""
    model, tokens = Transformer(TINY), SEQ[:1]
    cache = jqn.init_kv_cache(TINY, 1, tokens.shape[1], qtype=None)
    _, cache = jqn.prefill(model, tiny_params, tokens, cache)
    zeros = {
        f"block_{i}": {"attn": {"k": jnp.zeros_like(lc.k), "v": jnp.zeros_like(lc.v)}}
        for i, lc in enumerate(cache.layers)
    }

    def logits(pert):
        return model.apply({"params": tiny_params, "perturbations": pert}, tokens)

    return cache, jax.jit(jax.jacfwd(logits))(zeros)


def propagated_bound(cache, jac, qmax):
    """First-order bound on the logit error from quantizing the cached K/V.

    Each cached element is within ``delta = max_d |x[b, s, kv, :]| / (2 * qmax)`` of its float
    value, so ``|d logits| <= |J| @ delta`` to first order.
    """
    bound = 0.0
    for i, lc in enumerate(cache.layers):
        for name, x in (("k", lc.k), ("v", lc.v)):
            delta = jnp.broadcast_to(jnp.max(jnp.abs(x), -1, keepdims=True) / (2 * qmax), x.shape)
            j = jnp.abs(jac[f"block_{i}"]["attn"][name])
            bound = bound + jnp.einsum("bsvcthd,cthd->bsv", j, delta)
    return bound


@pytest.mark.parametrize("qtype,qmax", [("int8", 127), ("int4", 7)])
def test_quantized_cache_error_is_bounded_by_its_step(qtype, qmax, tiny_params, kv_jacobian):
    model, params, tokens = Transformer(TINY), tiny_params, SEQ[:1]
    float_cache, jac = kv_jacobian
    full = full_forward(model, params, tokens)
    bound = propagated_bound(float_cache, jac, qmax)
    dec, qcache = decode_logits(model, params, tokens, qtype)
    # 1) every cached element of layer 0 (whose K/V don't depend on earlier quantization) is
    #    within half a step of the float value.
    s = tokens.shape[1]
    fk = float_cache.layers[0].k
    qk = jqn.kv_cache.read_layer(qcache.layers[0], TINY.head_dim, jnp.float32)[0][:, :s]
    half_step = jnp.max(jnp.abs(fk), -1, keepdims=True) / (2 * qmax)
    assert bool(jnp.all(jnp.abs(qk - fk) <= half_step * (1 + 4 * EPS32) + 1e-7))
    # 2) the logits stay within the propagated bound (x1.5 for second-order terms).
    err = jnp.abs(dec - full)
    assert float(jnp.max(err)) > 0
    assert bool(jnp.all(err <= 1.5 * bound + reassociation_tol(TINY, full))), float(
        jnp.max(err / bound)
    )
    # 3) decoding step by step equals one prefill through the same quantized cache.
    once, _ = decode_logits(model, params, tokens, qtype, prompt=s)
    np.testing.assert_allclose(dec, once, rtol=0, atol=reassociation_tol(TINY, once))


def test_generate_greedy_and_sampling(tiny_params):
    model, params = Transformer(TINY), tiny_params
    prompt = SEQ[:, :4]
    out, logits = jqn.generate(model, params, prompt, 5, return_logits=True)
    assert out.shape == (2, 9)
    np.testing.assert_array_equal(out[:, :4], prompt)
    # Greedy: each new token is the argmax of the full forward at the previous position.
    full = full_forward(model, params, out)
    np.testing.assert_array_equal(out[:, 4:], jnp.argmax(full[:, 3:-1], -1))
    np.testing.assert_allclose(logits, full[:, 3:-1], rtol=0, atol=reassociation_tol(TINY, full))
    # The sampling path with top_k=1 must reproduce greedy decoding.
    top1 = jqn.generate(model, params, prompt, 5, temperature=0.7, top_k=1, key=jax.random.key(7))
    np.testing.assert_array_equal(top1, out)
    with pytest.raises(ValueError, match="key"):
        jqn.generate(model, params, prompt, 2, temperature=1.0)
    with pytest.raises(ValueError, match="max_len"):
        jqn.generate(model, params, prompt, 5, max_len=6)


def test_sample_follows_the_tempered_softmax():
    logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))
    n, temp = 4000, 2.0
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.vmap(lambda k: jqn.sample(logits, k, temp))(keys)[:, 0]
    p = np.asarray(jax.nn.softmax(logits[0] / temp))
    freq = np.bincount(np.asarray(draws), minlength=4) / n
    # Each frequency is within 4 binomial standard deviations of its probability.
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n)), (freq, p)
    np.testing.assert_array_equal(
        jqn.sample(logits, keys[0], temp), jqn.sample(logits, keys[0], temp)
    )
    top2 = jax.vmap(lambda k: jqn.sample(logits, k, temp, top_k=2))(keys[:200])
    assert set(np.asarray(top2).ravel().tolist()) == {2, 3}
    np.testing.assert_array_equal(jqn.sample(logits), [3])


def test_kv_cache_bytes_formula():
    cfg = TransformerConfig.smollm2_135m()
    b, t = 8, 2048
    n = cfg.n_layers * 2 * b * t * cfg.n_kv_heads  # (layer, k|v, batch, token, kv head)
    assert jqn.kv_cache_bytes(cfg, b, t, qtype=None) == n * cfg.head_dim * 4
    assert jqn.kv_cache_bytes(cfg, b, t, qtype="int8") == n * (cfg.head_dim + 4)
    assert jqn.kv_cache_bytes(cfg, b, t, qtype="int4") == n * (cfg.head_dim // 2 + 4)
    bf16 = TransformerConfig.smollm2_135m(dtype="bfloat16")
    assert jqn.kv_cache_bytes(bf16, b, t, qtype=None) == n * cfg.head_dim * 2
    with pytest.raises(ValueError, match="max_len"):
        jqn.init_kv_cache(TINY, 1, TINY.max_seq_len + 1)
