"""Running a plain linen model on quantized params, through ``nn.intercept_methods``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxquant.core import QArray, gather_rows
from jaxquant.core.dot_general import dot_general, einsum
from jaxquant.core.einsum_spec import parse_einsum
from jaxquant.nn.axes import dense_general_axes, einsum_str
from jaxquant.nn.rules import QuantRule, config_for, module_path


def quantized_interceptor(rules: Sequence[QuantRule]):
    """An ``nn.intercept_methods`` interceptor that runs Dense / DenseGeneral / Einsum layers
    whose ``kernel`` is a QArray through :func:`~jaxquant.core.dot_general.dot_general`, and
    ``nn.Embed`` layers whose ``embedding`` is one (lookup of the quantized rows; ``attend``
    through ``dot_general``).

    The activation side uses the config of the first rule matching the layer's path (so a
    w8a8 rule gives the integer product); layers with float kernels run unchanged.

    Example:
      >>> with nn.intercept_methods(quantized_interceptor(rules)):  # doctest: +SKIP
      ...     y = model.apply({"params": qparams}, x)
    """
    rules = tuple(rules)

    def interceptor(next_fun, args, kwargs, ctx):
        mod = ctx.module
        if isinstance(mod, nn.Embed):
            if ctx.method_name == "setup":  # skip the param's shape check (packed codes)
                table = mod.scope.get_variable("params", "embedding")
                if isinstance(table, QArray):
                    mod.embedding = table
                    return None
            if ctx.method_name in ("__call__", "attend"):
                return _embed(next_fun, args, kwargs, ctx)
            return next_fun(*args, **kwargs)
        if ctx.method_name != "__call__" or not isinstance(
            mod, (nn.Dense, nn.DenseGeneral, nn.Einsum)
        ):
            return next_fun(*args, **kwargs)
        p = mod.variables.get("params", {})
        kernel = p.get("kernel")
        if not isinstance(kernel, QArray):
            return next_fun(*args, **kwargs)
        config, _ = config_for(rules, module_path(mod))
        x = jnp.asarray(args[0])
        if mod.dtype is not None:
            x = x.astype(mod.dtype)
            kernel = dataclasses.replace(kernel, dtype=np.dtype(mod.dtype))
        bias = p.get("bias")
        if isinstance(mod, nn.Einsum):
            eq = einsum_str(mod, args)
            y = einsum(eq, x, kernel, config=config)
            if bias is not None:
                _, bshape = parse_einsum(eq).rhs_in_output(kernel.shape)
                y = y + jnp.reshape(bias, bshape)
            return y
        if isinstance(mod, nn.Dense):
            xc = (x.ndim - 1,)
        else:
            xc = dense_general_axes(mod, x.ndim)
        dn = ((xc, tuple(range(len(xc)))), ((), ()))
        y = dot_general(x, kernel, dn, mod.precision, config=config)
        if bias is not None:
            y = y + jnp.asarray(bias, y.dtype)
        return y

    def _embed(next_fun, args, kwargs, ctx):
        mod = ctx.module
        table = mod.embedding
        if not isinstance(table, QArray):
            return next_fun(*args, **kwargs)
        dtype = mod.dtype or table.dtype
        if ctx.method_name == "__call__":
            return gather_rows(table, jnp.asarray(args[0])).dequantize(dtype)
        config, _ = config_for(rules, module_path(mod))
        x = jnp.asarray(args[0]).astype(dtype)
        table = dataclasses.replace(table, dtype=np.dtype(dtype))
        return dot_general(x, table, (((x.ndim - 1,), (1,)), ((), ())), config=config)

    return interceptor
