"""A jitted next-token training step with optax, in float or quantization-aware (QAT) mode.

QAT needs nothing special here: a :class:`~jaxquant.nn.Transformer` whose config carries
quantization rules quantizes its kernels (and, with e.g. ``fully_quantized()``, its backward
products) inside ``dot_general`` in TRAIN mode. After training, ``jaxquant.nn.convert`` gives the
serving params that reproduce the trained quantized forward.

Example::

    model = Transformer(TransformerConfig.tiny().with_quantization(w8a8()))
    opt = make_optimizer(learning_rate=1e-3, warmup_steps=10, total_steps=100)
    state = init_train_state(model, opt, jax.random.key(0), tokens)
    step = make_train_step(model, opt)
    state, metrics = step(state, tokens)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxquant.nn.modes import LEARNED_SCALE


class TrainState(NamedTuple):
    """Everything a step updates: the step count, the float params and the optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


def make_schedule(
    learning_rate: float, warmup_steps: int, total_steps: int, end_ratio: float = 0.1
) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to
    ``end_ratio * learning_rate`` at ``total_steps``."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}."
        )
    if not 0.0 <= end_ratio <= 1.0:
        raise ValueError(f"end_ratio must be in [0, 1], got {end_ratio}.")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=learning_rate * end_ratio,
    )


def _decay_mask(params):
    """Weight decay on matrices (kernels, embeddings) only, not on norm scales nor on the
    learned weight scales of LSQ QAT (``kernel_scale``, a matrix of step sizes)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.ndim(p) >= 2 and LEARNED_SCALE not in jax.tree_util.keystr(path),
        params)


def make_optimizer(
    *,
    learning_rate: float = 3e-4,
    warmup_steps: int = 100,
    total_steps: int = 1000,
    end_ratio: float = 0.1,
    weight_decay: float = 0.1,
    clip_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a warmup + cosine schedule.

    Returns:
      ``optax.chain(clip_by_global_norm(clip_norm), adamw(schedule, ...))`` (no clipping when
      ``clip_norm`` is None).
    """
    schedule = make_schedule(learning_rate, warmup_steps, total_steps, end_ratio)
    parts = []
    if clip_norm is not None:
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}.")
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask)
    )
    return optax.chain(*parts)


def next_token_loss(
    logits: jax.Array, tokens: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``.

    Args:
      logits: ``[B, S, V]``.
      tokens: int ``[B, S]``.
      mask: optional ``[B, S]`` weights of the *target* tokens (1 = count it).

    Returns:
      ``(loss, n_tokens)``: the weighted mean over counted targets and their number.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tgt = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    w = jnp.ones_like(nll) if mask is None else mask[:, 1:].astype(jnp.float32)
    n = jnp.sum(w)
    return jnp.sum(nll * w) / jnp.maximum(n, 1.0), n


def init_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    tokens: jax.Array,
    params: Any = None,
) -> TrainState:
    """Initial state; ``params`` (e.g. pretrained) overrides a fresh ``model.init``."""
    if params is None:
        params = model.init(key, tokens)["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def make_train_step(
    model: nn.Module, optimizer: optax.GradientTransformation, *, jit: bool = True
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """A step ``(state, tokens [B, S], mask=None) -> (state, metrics)``.

    ``metrics`` holds ``loss`` (before the update), ``grad_norm`` (before clipping) and
    ``n_tokens``.
    """

    def loss_fn(params, tokens, mask):
        logits = model.apply({"params": params}, tokens)
        return next_token_loss(logits, tokens, mask)

    def step(state: TrainState, tokens: jax.Array, mask: jax.Array | None = None):
        (loss, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, tokens, mask)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "n_tokens": n}
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(step) if jit else step


def make_eval_step(model: nn.Module, *, jit: bool = True):
    """``(params, tokens, mask=None) -> (loss, n_tokens)`` without gradients."""

    def evaluate(params, tokens, mask=None):
        return next_token_loss(model.apply({"params": params}, tokens), tokens, mask)

    return jax.jit(evaluate) if jit else evaluate
