"""Prefill, per-step decoding and sampling for :class:`~jaxquant.nn.Transformer`.

:func:`stream` yields the tokens one step at a time (and stops at given stop ids);
:func:`generate` collects them. Each call is jitted once per shape: ``prefill`` per prompt
shape, ``decode_step`` once for all
positions (the cache is written at its traced ``length``). Works in any mode: TRAIN with float
params, or SERVE with converted params. With ``donate=True`` the input cache's buffers are
reused for the output (updated in place on GPU/TPU; the old cache must not be used again);
``generate`` donates on accelerators.

Example::

    tokens = generate(model, params, prompt, max_new_tokens=32, temperature=0.8,
                      key=jax.random.key(0), kv_cache_qtype="int8")
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.nn.kv_cache import KVCache, init_kv_cache
from jaxquant.nn.transformer import Transformer


def _apply(model: Transformer, params: Any, tokens: jax.Array, cache: KVCache):
    return model.apply({"params": params}, tokens, cache=cache)


_forward = jax.jit(_apply, static_argnums=0)
_forward_donated = jax.jit(_apply, static_argnums=0, donate_argnums=3)


def _donate_default() -> bool:
    return jax.default_backend() != "cpu"  # CPU ignores donation (with a warning)


def prefill(
    model: Transformer, params: Any, tokens: jax.Array, cache: KVCache, *, donate: bool = False
):
    """Runs the prompt ``tokens [B, P]`` through the model, filling ``cache``.

    Returns:
      ``(logits [B, P, V], cache)`` with ``cache.length`` advanced by ``P``.
    """
    fn = _forward_donated if donate else _forward
    return fn(model, params, jnp.asarray(tokens, jnp.int32), cache)


def decode_step(
    model: Transformer, params: Any, tokens: jax.Array, cache: KVCache, *, donate: bool = False
):
    """One step: ``tokens [B, 1]`` at position ``cache.length`` -> ``(logits [B, 1, V], cache)``."""
    fn = _forward_donated if donate else _forward
    return fn(model, params, jnp.asarray(tokens, jnp.int32), cache)


def sample(
    logits: jax.Array,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
) -> jax.Array:
    """Next tokens ``[B]`` from ``logits [B, V]``: greedy when ``temperature == 0``, else
    ``categorical(logits / temperature)`` restricted to the ``top_k`` largest if given."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError(
            "Sampling with temperature > 0 needs a PRNG key: pass key=jax.random.key(...)."
        )
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _step_and_sample_impl(model, params, tok, cache, key, temperature, top_k):
    logits, cache = model.apply({"params": params}, tok[:, None], cache=cache)
    return sample(logits[:, -1], key, temperature, top_k), logits[:, -1], cache


_step_and_sample = jax.jit(_step_and_sample_impl, static_argnums=(0, 5, 6))
_step_and_sample_donated = jax.jit(
    _step_and_sample_impl, static_argnums=(0, 5, 6), donate_argnums=3
)


def stream(
    model: Transformer,
    params: Any,
    prompt_tokens: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: jax.Array | None = None,
    max_len: int | None = None,
    kv_cache_qtype: str | None = "config",
    stop_ids: Sequence[int] = (),
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Yields ``(tokens [B], logits [B, V])`` one step at a time: greedy or sampled.

    The first item comes from the prefill of ``prompt_tokens [B, P]``, each next one from one
    decode step. It stops after ``max_new_tokens`` items, or after the step at which every
    sequence has produced one of ``stop_ids`` (the stop token is yielded; the caller decides
    whether to show it). Arguments are as for :func:`generate`.
    """
    prompt = jnp.asarray(prompt_tokens, jnp.int32)
    b, p = prompt.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    total = p + max_new_tokens
    max_len = total if max_len is None else max_len
    if max_len < total:
        raise ValueError(f"max_len={max_len} is shorter than prompt + new tokens = {total}.")
    if temperature != 0.0 and key is None:
        raise ValueError("temperature > 0 needs key=jax.random.key(...).")
    if key is None:
        key = jax.random.key(0)
    stops = np.asarray(sorted({int(t) for t in stop_ids}), np.int32)
    done = np.zeros(b, bool)
    donate = _donate_default()
    step = _step_and_sample_donated if donate else _step_and_sample
    cache = init_kv_cache(model.cfg, b, max_len, qtype=kv_cache_qtype)
    logits, cache = prefill(model, params, prompt, cache, donate=donate)
    key, sub = jax.random.split(key)
    tok, last = sample(logits[:, -1], sub, temperature, top_k), logits[:, -1]
    for i in range(max_new_tokens):
        if i:
            key, sub = jax.random.split(key)
            tok, last, cache = step(model, params, tok, cache, sub, float(temperature), top_k)
        yield tok, last
        if stops.size:
            done |= np.isin(np.asarray(tok), stops)
            if done.all():
                return


def generate(
    model: Transformer,
    params: Any,
    prompt_tokens: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: jax.Array | None = None,
    max_len: int | None = None,
    kv_cache_qtype: str | None = "config",
    return_logits: bool = False,
):
    """Greedy (``temperature=0``) or sampled continuation of ``prompt_tokens [B, P]``.

    Args:
      model: a :class:`Transformer` (any mode matching ``params``).
      params: its params.
      prompt_tokens: int ``[B, P]`` (all prompts the same length).
      max_new_tokens: tokens to generate.
      temperature: 0 for greedy, else the sampling temperature.
      top_k: sample only among the ``top_k`` most likely tokens.
      key: PRNG key (needed when ``temperature > 0``); split once per step.
      max_len: cache capacity, default ``P + max_new_tokens``.
      kv_cache_qtype: None, ``"int8"`` or ``"int4"``; default ``model.cfg.kv_cache_qtype``.
      return_logits: also return the logits ``[B, max_new_tokens, V]`` each token was drawn from.

    Returns:
      ``tokens [B, P + max_new_tokens]`` (and the logits when asked).
    """
    prompt = jnp.asarray(prompt_tokens, jnp.int32)
    out, all_logits = [], []
    for tok, last in stream(model, params, prompt, max_new_tokens, temperature=temperature,
                            top_k=top_k, key=key, max_len=max_len,
                            kv_cache_qtype=kv_cache_qtype):
        out.append(tok)
        all_logits.append(last)
    tokens = jnp.concatenate([prompt, jnp.stack(out, axis=1)], axis=1)
    if return_logits:
        return tokens, jnp.stack(all_logits, axis=1)
    return tokens
