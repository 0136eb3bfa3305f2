"""A Hugging Face LLaMA folder written here gives the logits of an independent numpy forward.

The reference below is written from the Hugging Face modelling code's definitions, not from
jaxquant: weights stay in HF's ``[out, in]`` layout, RoPE is ``rotate_half`` with
``inv_freq = theta ** (-2i / hd)``, grouped-query attention repeats each KV head ``H // KV``
times (``repeat_kv``), and everything runs in float64. Only the Flax model runs in float32.
"""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxquant.models.weights import load_model
from jaxquant.nn.config import TransformerConfig
from jaxquant.nn.transformer import Transformer

HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": 96,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
SEQ = 16
# The Flax model accumulates in float32 over a few hundred terms per dot, through two blocks:
# allow a thousand float32 ulps of the logit scale. A wrong RoPE layout, GQA grouping or norm
# is off by more than 1% of the scale (see test_the_comparison_sees_the_rope_layout).
TOL = 1000 * np.finfo(np.float32).eps


def _hf_tensors(c, rng):
    """Random HF weights, ``[out, in]``, scaled by ``1/sqrt(in)`` so activations stay O(1)."""
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd

    def mat(out, inp):
        return rng.normal(size=(out, inp)) / np.sqrt(inp)

    def norm(n):
        return 1.0 + 0.2 * rng.normal(size=n)

    t = {"model.embed_tokens.weight": rng.normal(size=(v, d)), "model.norm.weight": norm(d)}
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = mat(v, d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": norm(d),
            p + "self_attn.q_proj.weight": mat(q, d),
            p + "self_attn.k_proj.weight": mat(kv, d),
            p + "self_attn.v_proj.weight": mat(kv, d),
            p + "self_attn.o_proj.weight": mat(d, q),
            p + "post_attention_layernorm.weight": norm(d),
            p + "mlp.gate_proj.weight": mat(f, d),
            p + "mlp.up_proj.weight": mat(f, d),
            p + "mlp.down_proj.weight": mat(d, f),
        }
    return {k: a.astype(np.float32) for k, a in t.items()}


def _write_hf_folder(folder, **overrides):
    """config.json, one safetensors file and a byte-level tokenizer.json; returns the tensors."""
    config = {**HF_CONFIG, **overrides}
    tensors = _hf_tensors(config, np.random.default_rng(0))
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    return config, tensors


# --- the reference: Hugging Face's LlamaForCausalLM in numpy float64 -------------------------
def _rms_norm(x, weight, eps):
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope_half(x, theta):
    """``x [B, H, S, hd]``: HF's ``x * cos + rotate_half(x) * sin``."""
    hd, s = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    freqs = np.arange(s)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [S, hd]
    return x * np.cos(emb) + _rotate_half(x) * np.sin(emb)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def hf_llama_logits(c, t, tokens):
    """Logits ``[B, S, V]`` of HF's LLaMA for ``tokens [B, S]`` (``t``: HF tensors, [out, in])."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    n_h, n_kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c["hidden_size"] // n_h
    eps, theta = c["rms_norm_eps"], c["rope_theta"]
    b, s = tokens.shape

    def linear(x, name):
        return x @ t[name].T

    def heads(x, n):
        return x.reshape(b, s, n, hd).transpose(0, 2, 1, 3)  # [B, n, S, hd]

    x = t["model.embed_tokens.weight"][tokens]
    causal = np.tril(np.ones((s, s), bool))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, t[p + "input_layernorm.weight"], eps)
        q = _rope_half(heads(linear(h, p + "self_attn.q_proj.weight"), n_h), theta)
        k = _rope_half(heads(linear(h, p + "self_attn.k_proj.weight"), n_kv), theta)
        v = heads(linear(h, p + "self_attn.v_proj.weight"), n_kv)
        k = np.repeat(k, n_h // n_kv, axis=1)  # repeat_kv: query head j reads kv head j // G
        v = np.repeat(v, n_h // n_kv, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, n_h * hd)
        x = x + linear(attn, p + "self_attn.o_proj.weight")
        h = _rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
        gated = _silu(linear(h, p + "mlp.gate_proj.weight")) * linear(h, p + "mlp.up_proj.weight")
        x = x + linear(gated, p + "mlp.down_proj.weight")
    x = _rms_norm(x, t["model.norm.weight"], eps)
    head = "model.embed_tokens.weight" if c["tie_word_embeddings"] else "lm_head.weight"
    return x @ t[head].T


# --- the tests -------------------------------------------------------------------------------
def _flax_logits(folder, tokens, **cfg_overrides):
    params, config, _ = load_model(folder)
    cfg = dataclasses.replace(TransformerConfig.from_dict(config), **cfg_overrides)
    return np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(tokens)))


def _tokens(vocab):
    return np.random.default_rng(1).integers(0, vocab, size=(2, SEQ)).astype(np.int32)


def _max_rel_diff(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_logits_match_hf_reference(tmp_path, tied):
    config, tensors = _write_hf_folder(tmp_path / "m", tie_word_embeddings=tied)
    tokens = _tokens(config["vocab_size"])
    want = hf_llama_logits(config, tensors, tokens)
    got = _flax_logits(tmp_path / "m", tokens)
    assert got.shape == want.shape == (2, SEQ, config["vocab_size"])
    assert got.dtype == np.float32
    diff = _max_rel_diff(got, want)
    assert diff < TOL, f"max |flax - hf| / max |hf| = {diff:.2e} (tolerance {TOL:.1e})"


def test_the_comparison_sees_the_rope_layout(tmp_path):
    """The same weights under llama.cpp's adjacent RoPE must fail the tolerance by far."""
    config, tensors = _write_hf_folder(tmp_path / "m")
    tokens = _tokens(config["vocab_size"])
    want = hf_llama_logits(config, tensors, tokens)
    got = _flax_logits(tmp_path / "m", tokens, rope_layout="adjacent")
    np.testing.assert_allclose(got[:, 0], want[:, 0], atol=TOL * np.max(np.abs(want)))
    assert _max_rel_diff(got, want) > 100 * TOL
