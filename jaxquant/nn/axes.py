"""Which kernel axes each layer of a linen model contracts (what ``quantize_operand`` needs)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.core.einsum_spec import parse_einsum
from jaxquant.nn.rules import module_path


def dense_general_axes(mod: nn.DenseGeneral, ndim: int) -> tuple[int, ...]:
    """The input axes an ``nn.DenseGeneral`` contracts, for an input of rank ``ndim``."""
    axis = mod.axis if isinstance(mod.axis, Sequence) else (mod.axis,)
    if mod.batch_dims:
        raise ValueError(f"{module_path(mod)}: DenseGeneral with batch_dims is not supported.")
    return tuple(a % ndim for a in axis)


def einsum_str(mod: nn.Einsum, args) -> str:
    """The equation an ``nn.Einsum`` call uses: the call's argument, else the module's."""
    return args[1] if len(args) > 1 and args[1] is not None else mod.einsum_str


def infer_contracting_axes(
    model: nn.Module, *example_args, **example_kwargs
) -> dict[str, tuple[int, ...]]:
    """``{module path: kernel contracting axes}`` for every Dense / DenseGeneral / Einsum / Embed
    (and jaxquant's Q layers).

    Traces ``model.init`` abstractly (``jax.eval_shape``: nothing is computed).
    """
    found = {}

    def record(next_fun, args, kwargs, ctx):
        mod = ctx.module
        if ctx.method_name == "__call__":
            if isinstance(mod, nn.Dense):
                found[module_path(mod)] = (0,)
            elif isinstance(mod, nn.DenseGeneral):
                n = len(dense_general_axes(mod, jnp.ndim(args[0])))
                found[module_path(mod)] = tuple(range(n))
            elif isinstance(mod, nn.Einsum):
                found[module_path(mod)] = parse_einsum(einsum_str(mod, args)).rhs_contracting
            elif isinstance(mod, nn.Embed):
                found[module_path(mod)] = (1,)
            elif hasattr(mod, "kernel_contracting_axes"):  # jaxquant's own Q layers
                found[module_path(mod)] = tuple(mod.kernel_contracting_axes())
        return next_fun(*args, **kwargs)

    def init():
        with nn.intercept_methods(record):
            return model.init(jax.random.key(0), *example_args, **example_kwargs)

    jax.eval_shape(init)
    return found
