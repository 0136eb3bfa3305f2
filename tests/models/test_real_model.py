"""Correctness on the real SmolLM2-135M GGUF (slow: 93 MB model, minutes of CPU).

* An independent numpy float64 forward of the embedding and the first two decoder layers, with
  llama.cpp's adjacent-pair RoPE, gives the logits of the Flax model truncated to two blocks.
* Perplexity on the first 4096 PTB-test tokens is that of a language model, not of a guess.
* ``rtn:int4:g32:asym`` rebuilds the file's own Q4_1 grid, so it costs (almost) nothing.
* Greedy generation is English.

Run with ``pytest -m slow tests/io/test_real_model.py``. The measured numbers (logit gap,
perplexities, the completion) are recorded with ``record_property``; add
``--junitxml=out.xml -o junit_family=legacy`` to read them.
"""

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.eval.generation import generate_text
from jaxquant.eval.tasks import evaluate
from jaxquant.models.fetch import resolve_model
from jaxquant.models.gguf_loader import load_gguf
from jaxquant.models.registry import load
from jaxquant.nn.transformer import Transformer
from jaxquant.ptq.recipe import parse_recipe

pytestmark = pytest.mark.slow

NAME = "smollm2-135m"
SENTENCE = "The quick brown fox jumps over the lazy dog, and the farmer watches from the barn."
EVAL_TOKENS, SEQ_LEN = 4096, 1024
# float32 accumulation over up to 1536 terms per dot, two blocks, then the 49152-way head:
# a thousand float32 ulps of the logit scale (the measured gap is about a hundred times less).
TOL = 1000 * np.finfo(np.float32).eps


@pytest.fixture(scope="module")
def model():
    return load(NAME)


@pytest.fixture(scope="module")
def fp32_ppl(model):
    return evaluate(model, max_tokens=EVAL_TOKENS, seq_len=SEQ_LEN, progress=False)["perplexity"]


# --- the reference: llama.cpp's LLaMA graph in numpy float64 ---------------------------------
def _rms_norm(x, weight, eps):
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rope_adjacent(x, theta):
    """``x [S, H, hd]``: rotate the pairs ``(x[2i], x[2i+1])`` by ``pos * theta^(-2i/hd)``."""
    s, _, hd = x.shape
    ang = np.arange(s)[:, None, None] * theta ** (-np.arange(0, hd, 2) / hd)  # [S, 1, hd/2]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(ang) - odd * np.sin(ang)
    out[..., 1::2] = even * np.sin(ang) + odd * np.cos(ang)
    return out


def reference_logits(weights, c, tokens, n_layers):
    """Logits ``[S, V]`` after ``n_layers`` blocks; ``weights`` canonical (kernels [in, out])."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    s, hd, eps = len(tokens), c["head_dim"], c["rms_eps"]
    n_h, n_kv = c["n_heads"], c["n_kv_heads"]
    causal = np.tril(np.ones((s, s), bool))
    x = w["embed"][tokens]  # [S, D]
    for i in range(n_layers):
        p = f"layers.{i}."
        h = _rms_norm(x, w[p + "attn_norm"], eps)
        q = _rope_adjacent((h @ w[p + "q"]).reshape(s, n_h, hd), c["rope_theta"])
        k = _rope_adjacent((h @ w[p + "k"]).reshape(s, n_kv, hd), c["rope_theta"])
        v = (h @ w[p + "v"]).reshape(s, n_kv, hd)
        out = np.empty((s, n_h, hd))
        for head in range(n_h):
            kv = head // (n_h // n_kv)  # consecutive query heads share a KV head
            scores = q[:, head] @ k[:, kv].T / np.sqrt(hd)
            scores = np.where(causal, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, head] = (probs / probs.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + out.reshape(s, n_h * hd) @ w[p + "o"]
        h = _rms_norm(x, w[p + "mlp_norm"], eps)
        gate = h @ w[p + "gate"]
        x = x + (gate / (1.0 + np.exp(-gate)) * (h @ w[p + "up"])) @ w[p + "down"]
    x = _rms_norm(x, w["final_norm"], eps)
    return x @ (w["embed"].T if c["tie_embeddings"] else w["lm_head"])


# --- the tests -------------------------------------------------------------------------------
def test_first_two_layers_match_numpy_reference(model, record_property):
    weights, config = load_gguf(resolve_model(NAME))
    assert config["rope_layout"] == "adjacent" and config["tie_embeddings"]
    tokens = np.asarray(model.tokenizer.encode(SENTENCE), np.int32)
    assert len(tokens) > 10
    want = reference_logits(weights, config, tokens, n_layers=2)

    cfg = dataclasses.replace(model.cfg, n_layers=2)
    params = {k: model.params[k] for k in ("embed", "block_0", "block_1", "final_norm")}
    got = np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(tokens)[None]))[0]

    assert got.shape == want.shape == (len(tokens), config["vocab_size"])
    diff = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    record_property("max_rel_logit_diff", diff)
    assert diff < TOL, f"max |flax - numpy| / max |numpy| = {diff:.2e} (tolerance {TOL:.1e})"

    # The check has teeth: Hugging Face's half-split RoPE on these weights misses by far.
    half = Transformer(dataclasses.replace(cfg, rope_layout="half"))
    wrong = np.asarray(half.apply({"params": params}, jnp.asarray(tokens)[None]))[0]
    assert np.max(np.abs(wrong - want)) / np.max(np.abs(want)) > 100 * TOL


def test_fp32_perplexity_is_sane(fp32_ppl, record_property):
    record_property("perplexity_fp32", fp32_ppl)
    # A uniform guess scores 49152; a wrong RoPE layout about 3x the right value.
    assert 10 < fp32_ppl < 200, f"fp32 perplexity {fp32_ppl:.3f} on {EVAL_TOKENS} PTB tokens"


def test_int4_g32_asym_recreates_the_q4_1_grid(model, fp32_ppl, record_property):
    res = evaluate(
        model,
        recipe=parse_recipe("rtn:int4:g32:asym"),
        max_tokens=EVAL_TOKENS,
        seq_len=SEQ_LEN,
        progress=False,
    )
    rel = res["perplexity"] / fp32_ppl - 1.0
    record_property("perplexity_int4_g32_asym", res["perplexity"])
    assert abs(rel) < 0.01, (
        f"rtn:int4:g32:asym perplexity {res['perplexity']:.4f} vs fp32 {fp32_ppl:.4f}: "
        f"relative difference {rel:+.3%}, expected within 1% (Q4_1 weights re-quantized)"
    )


COMMON_WORDS = {
    "the", "a", "an", "of", "and", "is", "in", "to", "it", "city", "capital", "france",
    "french", "its", "also", "known", "as", "largest", "country", "which", "that", "was",
}  # fmt: skip


def test_greedy_generation_is_english(model, record_property):
    text = generate_text(model, "The capital of France is", max_new_tokens=20)["completion"]
    record_property("completion", text)
    # English prose may hold digits and punctuation (" Paris.\n\nThe answer is: 2018-01-22"),
    # but it is ASCII, and letters and spaces are the larger part of it.
    n = max(len(text), 1)
    assert sum(ch.isascii() for ch in text) >= 0.9 * n, f"not ASCII: {text!r}"
    letters = sum(ch.isascii() and (ch.isalpha() or ch.isspace()) for ch in text)
    assert letters >= 0.5 * n, f"not mostly letters and spaces: {text!r}"
    words = re.findall(r"[a-z]+", text.lower())
    common = sum(w in COMMON_WORDS for w in words)
    assert "Paris" in text or common >= 2, f"not English: {text!r}"
