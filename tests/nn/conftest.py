"""Shared tiny-model params: initialised once per session (init is the slow part on CPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from jaxquant.nn import Transformer, TransformerConfig

TINY = TransformerConfig.tiny()


def init_params(cfg, key=1):
    # Quantization rules don't change the float param tree, so one init serves every config.
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.jit(Transformer(cfg).init)(jax.random.key(key), tokens)["params"]


@pytest.fixture(scope="session")
def tiny_params():
    return init_params(TINY)


@pytest.fixture(scope="session")
def untied_params():
    return init_params(dataclasses.replace(TINY, tie_embeddings=False))
