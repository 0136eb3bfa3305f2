"""A non-finite loss is an error naming the window, never a perplexity (issue 13)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.errors import JaxquantError, NonFiniteError
from jaxquant.eval.perplexity import perplexity


def _nan_where(bad_token, vocab=16):
    """Uniform logits, NaN in every window holding ``bad_token``."""

    def apply(params, t):
        logits = jnp.zeros(t.shape + (vocab,))
        poisoned = jnp.any(t == bad_token, axis=1)[:, None, None]
        return jnp.where(poisoned, jnp.nan, logits)

    return apply


@pytest.mark.parametrize("batch_size", [1, 3])
def test_nan_window_is_named(batch_size):
    tokens = np.zeros(32 * 5, np.int32)
    tokens[2 * 32 + 5] = 7  # only window 2 goes NaN
    with pytest.raises(NonFiniteError, match=r"window 2 of 5 \(tokens 64\.\.95\)"):
        perplexity(_nan_where(7), {}, tokens, seq_len=32, batch_size=batch_size, progress=False)


def test_nll_above_709_is_an_error_not_an_overflow():
    # The model puts logit 2000 on token 1 and scores only token 0: NLL ~ 2000 nats per token.
    def apply(params, t):
        return jnp.zeros(t.shape + (4,)).at[..., 1].set(2000.0)

    with pytest.raises(NonFiniteError, match="overflows a float"):
        perplexity(apply, {}, np.zeros(64, np.int32), seq_len=32, progress=False)


def test_large_but_representable_nll_is_a_result():
    def apply(params, t):  # NLL ~ 700 nats: exp(700) ~ 1e304 still fits a float64
        return jnp.zeros(t.shape + (4,)).at[..., 1].set(700.0)

    r = perplexity(apply, {}, np.zeros(64, np.int32), seq_len=32, progress=False)
    assert np.isfinite(r.perplexity) and r.perplexity > 1e300


def test_batch_size_zero_is_a_clear_error():
    with pytest.raises(ValueError, match=r"--batch-size"):
        perplexity(_nan_where(99), {}, np.zeros(64, np.int32), seq_len=32, batch_size=0,
                   progress=False)


def test_nonfinite_error_is_a_jaxquant_value_error():
    assert issubclass(NonFiniteError, JaxquantError) and issubclass(NonFiniteError, ValueError)
