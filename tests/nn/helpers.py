"""Test helpers: one jitted forward shared by all tests (compiled once per model)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.nn import Transformer

EPS32 = float(np.finfo(np.float32).eps)


@functools.partial(jax.jit, static_argnums=0)
def fwd(model, params, tokens):
    """``model.apply({"params": params}, tokens)``, jitted and cached by the (hashable) module."""
    return model.apply({"params": params}, tokens)


def reassociation_tol(cfg, logits):
    """Tolerance for two computations that differ only by float reassociation.

    TRAIN vs SERVE use the same codes and scales, and cached vs full attention sums the same
    terms (plus exact zeros for masked keys); only the order of float sums or of the rescale
    differs: a few ulps (of the compute dtype) of each product's output. ``7 * n_layers + 1``
    products run in sequence, and the normalized residual stream carries their errors to the
    logits with gain ~1.
    """
    eps = float(jnp.finfo(cfg.compute_dtype).eps)
    n_products = 7 * cfg.n_layers + 1
    return 4 * eps * n_products * float(jnp.max(jnp.abs(logits)))


def random_params(cfg, seed=1):
    """Params of ``Transformer(cfg)`` drawn with numpy: normal(0, init_std) matrices and unit norm
    scales, like ``init`` but without compiling a jitted init (the slow part on CPU). The tree
    comes from ``jax.eval_shape(init)``, so it is exactly the model's. Quantization rules don't
    change the float tree, so one draw serves every quantized variant of a config."""
    model = Transformer(cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    rng = np.random.default_rng(seed)

    def draw(s):
        if len(s.shape) == 1:  # RMSNorm scales
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0.0, cfg.init_std, s.shape), s.dtype)

    return jax.tree.map(draw, shapes)


def step_per_element(q):
    """A QArray's ``scale`` repeated to its shape: each element's quantization step."""
    s = q.scale
    for a, (n, m) in enumerate(zip(q.shape, s.shape, strict=True)):
        if m not in (1, n):
            s = jnp.repeat(s, n // m, axis=a)
    return jnp.broadcast_to(s, q.shape)
