"""Test helpers: one jitted forward shared by all tests (compiled once per model)."""

import functools

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


@functools.partial(jax.jit, static_argnums=0)
def fwd(model, params, tokens):
    """``model.apply({"params": params}, tokens)``, jitted and cached by the (hashable) module."""
    return model.apply({"params": params}, tokens)
