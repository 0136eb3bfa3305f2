"""Training step: float and QAT (w8a8, fully quantized) lower the loss on a fixed batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxquant.core.dot_config import fully_quantized, w8a8
from jaxquant.nn import QuantMode, Transformer, TransformerConfig, convert
from jaxquant.train import (
    init_train_state,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    next_token_loss,
)
from tests.nn.helpers import random_params

TINY = TransformerConfig.tiny(n_layers=1)  # one block: QAT compiles are the slow part
# A learnable batch: a repeating byte pattern, so a few steps visibly reduce the loss.
TOKENS = jnp.tile(jnp.arange(16, dtype=jnp.int32) * 7 % 256, (4, 2))


@pytest.fixture(scope="module")
def init_params():
    return random_params(TINY)


@pytest.mark.parametrize(
    "name,qcfg", [("float", None), ("w8a8", w8a8()), ("fully_quantized", fully_quantized())]
)
def test_qat_steps_lower_the_loss(name, qcfg, init_params):
    model = Transformer(TINY.with_quantization(qcfg))
    opt = make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=20, weight_decay=0.0)
    state = init_train_state(model, opt, jax.random.key(0), TOKENS, params=init_params)
    step = make_train_step(model, opt)
    losses = []
    for _ in range(6):
        state, metrics = step(state, TOKENS)
        losses.append(float(metrics["loss"]))  # the loss before each update
        assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    assert int(state.step) == 6
    # Starts near log(256) (uniform); must drop clearly, not by noise.
    assert losses[0] == pytest.approx(np.log(256), abs=0.1)
    assert losses[-1] < losses[0] - 0.5, losses
    if name == "w8a8":  # the trained QAT params convert, and SERVE reproduces the QAT loss
        sp = convert(model, state.params)
        serve = Transformer(model.cfg, mode=QuantMode.SERVE)
        loss, _ = next_token_loss(jax.jit(serve.apply)({"params": sp}, TOKENS), TOKENS)
        _, metrics = step(state, TOKENS)  # the QAT loss of the current params
        np.testing.assert_allclose(loss, metrics["loss"], rtol=1e-5)


def test_eval_step_and_loss_match_optax(init_params):
    loss, n = make_eval_step(Transformer(TINY))(init_params, TOKENS)
    assert float(n) == TOKENS.shape[0] * (TOKENS.shape[1] - 1) and np.isfinite(float(loss))

    logits = jax.random.normal(jax.random.key(1), (2, 5, 11))
    tokens = jax.random.randint(jax.random.key(2), (2, 5), 0, 11)
    loss, n = next_token_loss(logits, tokens)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    assert float(n) == 8
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss_m, n_m = next_token_loss(logits, tokens, mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    np.testing.assert_allclose(loss_m, (ce * mask[:, 1:]).sum() / 6, rtol=1e-6)
    assert float(n_m) == 6


def test_schedule_and_validation():
    sched = make_schedule(1.0, warmup_steps=10, total_steps=110, end_ratio=0.1)
    assert float(sched(0)) == 0.0
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(110)) == pytest.approx(0.1)
    assert float(sched(60)) == pytest.approx(0.55, abs=1e-6)  # cosine midpoint
    with pytest.raises(ValueError, match="warmup_steps"):
        make_schedule(1.0, warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="clip_norm"):
        make_optimizer(clip_norm=0.0)
