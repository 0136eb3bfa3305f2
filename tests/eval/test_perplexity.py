"""Perplexity: exact values on models whose likelihood is known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.eval.perplexity import make_windows, perplexity


def _uniform(vocab):
    return lambda params, t: jnp.zeros(t.shape + (vocab,))


def _bigram(params, t):
    # log p(next | cur) = log_softmax(table[cur])
    return params["table"][t]


def test_uniform_model_has_perplexity_vocab():
    tokens = np.arange(1000) % 37
    r = perplexity(_uniform(37), {}, tokens, seq_len=64, progress=False)
    assert r.perplexity == pytest.approx(37.0, rel=1e-5)
    assert r.windows == 1000 // 64
    assert r.tokens_scored == r.windows * 63


def test_bigram_matches_closed_form_and_batches_agree():
    rng = np.random.default_rng(0)
    v = 11
    table = jnp.asarray(rng.normal(size=(v, v)), jnp.float32)
    tokens = rng.integers(0, v, size=777)
    logp = np.asarray(jax.nn.log_softmax(table, axis=-1))
    win, score = make_windows(tokens, 32)
    expect = -np.mean([logp[w[i], w[i + 1]] for w in win for i in range(31)])
    for bs in (1, 3, 8):  # 3 and 8 do not divide 24 windows evenly -> padding path
        r = perplexity(_bigram, {"table": table}, tokens, seq_len=32, batch_size=bs, progress=False)
        assert r.nll == pytest.approx(expect, rel=1e-5)


def test_sliding_window_scores_each_token_once():
    tokens = np.arange(100)
    win, score = make_windows(tokens, 32, stride=8)
    targets = [w[t + 1] for w, s in zip(win, score, strict=True) for t in range(31) if s[t]]
    assert sorted(targets) == list(range(1, win[-1][-1] + 1))


def test_bad_windows_raise():
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows(np.arange(10), 32)
    with pytest.raises(ValueError, match="stride"):
        make_windows(np.arange(100), 32, stride=64)
