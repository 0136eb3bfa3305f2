"""Quantization rules by module path, for any linen model.

A :class:`QuantRule` pairs a regular expression on the ``'/'``-joined module path (e.g.
``"block_3/attn/q_proj"``) with a :class:`~jaxquant.core.dot_config.DotGeneralConfig`. The first
rule whose pattern matches (``re.search``; anchor with ``^``/``$`` for exact paths) decides;
a rule with ``config=None`` keeps the matched layers float.

Two ways to use them:

* inside jaxquant's own layers and :class:`~jaxquant.nn.Transformer` (rules in the config);
* on a plain linen model written with ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` /
  ``nn.Embed``:
  :func:`quantize_params` turns its float kernels into QArrays, and
  :func:`quantized_interceptor` runs the model on them (through ``nn.intercept_methods``)::

      qparams, report = quantize_params(params, rules)
      with nn.intercept_methods(quantized_interceptor(rules)):
          y = model.apply({"params": qparams}, x)
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxquant.core import QArray
from jaxquant.core.dot_config import DotGeneralConfig
from jaxquant.core.dot_general import dot_general, einsum, quantize_operand

STATIC_ACTIVATIONS = ("absmax", "percentile")


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """Quantize the layers whose module path matches ``pattern`` with ``config``.

    Attributes:
      pattern: regular expression searched in the ``'/'``-joined module path.
      config: the layer's :class:`DotGeneralConfig`, or None to keep it float.
      static_activation: None for dynamic activation scales (the config's), or ``"absmax"`` /
        ``"percentile"``: serve with one static per-tensor activation scale calibrated in
        ``CALIBRATE`` mode (needs ``config.lhs`` without groups). TRAIN mode keeps dynamic
        scales (there are no statistics yet); CONVERT stores the scale and SERVE uses it.

    Example:
      >>> rules = (QuantRule(r"lm_head", None), QuantRule(r"block_\\d+/", w8a8()))
    """

    pattern: str
    config: DotGeneralConfig | None
    static_activation: str | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise ValueError(f"pattern must be a str (a regex), got {type(self.pattern).__name__}.")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regex: {e}.") from e
        if self.config is not None and not isinstance(self.config, DotGeneralConfig):
            raise ValueError(
                f"config must be a DotGeneralConfig or None, got {type(self.config).__name__}."
            )
        if self.static_activation is not None:
            if self.static_activation not in STATIC_ACTIVATIONS:
                raise ValueError(
                    f"static_activation must be None or one of {STATIC_ACTIVATIONS}, got "
                    f"{self.static_activation!r}."
                )
            if self.config is None or self.config.lhs is None:
                raise ValueError(
                    "static_activation needs a config that quantizes the activations (lhs), "
                    "e.g. w8a8(); weight-only configs have no activation scale."
                )
            if self.config.lhs.group_size is not None:
                raise ValueError(
                    "static_activation uses one per-tensor scale; drop group_size from the lhs spec."
                )

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


def match_rule(rules: Sequence[QuantRule], path: str) -> tuple[int, QuantRule] | None:
    """The first rule matching ``path`` and its index, or None."""
    for i, r in enumerate(rules):
        if r.matches(path):
            return i, r
    return None


def config_for(rules: Sequence[QuantRule], path: str) -> tuple[DotGeneralConfig | None, str | None]:
    """``(config, static_activation)`` of the first rule matching ``path``; ``(None, None)``."""
    m = match_rule(rules, path)
    if m is None:
        return None, None
    return m[1].config, m[1].static_activation


def module_path(module: nn.Module, child: str | None = None) -> str:
    """The ``'/'``-joined path of a bound module (plus ``child``), as the rules see it."""
    parts = tuple(module.path) + ((child,) if child else ())
    return "/".join(str(p) for p in parts)


# --- quantizing a param tree --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_params` did.

    Attributes:
      matched: ``{module path: index of the rule that matched}`` for every kernel some rule
        matched (quantized or deliberately kept float by a None config).
      quantized: paths whose kernel is now a QArray.
      unmatched_paths: kernels no rule matched (left float).
      unmatched_rules: rules that matched no kernel (likely a typo in the pattern).
      rules: the rules, to look the indices up.
    """

    matched: dict[str, int]
    quantized: tuple[str, ...]
    unmatched_paths: tuple[str, ...]
    unmatched_rules: tuple[QuantRule, ...]
    rules: tuple[QuantRule, ...]

    def __str__(self) -> str:
        lines = []
        for p, i in self.matched.items():
            what = "quantized" if p in self.quantized else "float"
            lines.append(f"{p}: rule {i} ({self.rules[i].pattern!r}) -> {what}")
        for p in self.unmatched_paths:
            lines.append(f"{p}: no rule -> float")
        for r in self.unmatched_rules:
            lines.append(f"rule {r.pattern!r} matched nothing")
        return "\n".join(lines)


ContractingAxes = Mapping[str, tuple[int, ...]] | Callable[[str, tuple[int, ...]], tuple[int, ...]]


def quantize_params(
    params: Any,
    rules: Sequence[QuantRule],
    *,
    contracting_axes: ContractingAxes | None = None,
    warn: bool = True,
) -> tuple[Any, QuantReport]:
    """Quantizes every ``kernel`` (and ``embedding``) leaf of a linen param tree by the first
    matching rule.

    The kernel at ``a/b/kernel`` has module path ``a/b``. It is replaced by
    ``quantize_operand(kernel, rule.config.rhs, contracting_axes)`` (what the quantized
    ``dot_general`` would do to it on the fly), so serving reproduces the quantized forward.
    An ``embedding`` table ``[V, D]`` is quantized as the rhs of the tied head ``x . E^T``
    (contracting axis 1: a scale per row, or groups along ``D``), as :class:`~jaxquant.nn.QEmbed`
    and the interceptor's ``nn.Embed`` support expect.

    Args:
      params: the ``params`` collection (nested dicts).
      rules: :class:`QuantRule` s, first match wins.
      contracting_axes: the kernel axes each layer contracts. None: ``(0,)`` for kernels
        (``nn.Dense``, a single-input-axis ``nn.DenseGeneral``), ``(1,)`` for embeddings; else a ``{path: axes}`` mapping (see
        :func:`infer_contracting_axes`) or a function ``(path, shape) -> axes``.
      warn: emit a ``UserWarning`` for rules that matched nothing.

    Returns:
      ``(new_params, report)``; see :class:`QuantReport`.

    Example:
      >>> qparams, report = quantize_params(params, [QuantRule("Dense_0", w8a8())])  # doctest: +SKIP
      >>> report.unmatched_rules  # doctest: +SKIP
      ()
    """
    rules = tuple(rules)
    flat = traverse_util.flatten_dict(_as_dict(params))
    used = set()
    matched, quantized, unmatched = {}, [], []
    new = {}
    for key, leaf in flat.items():
        new[key] = leaf
        if key[-1] not in ("kernel", "embedding"):
            continue
        path = "/".join(str(k) for k in key[:-1])
        m = match_rule(rules, path)
        if m is None:
            unmatched.append(path)
            continue
        i, rule = m
        used.add(i)
        matched[path] = i
        if rule.config is None or rule.config.rhs is None or isinstance(leaf, QArray):
            continue
        axes = _axes_for(contracting_axes, path, tuple(np.shape(leaf)), key[-1])
        new[key] = quantize_operand(jnp.asarray(leaf), rule.config.rhs, axes)
        quantized.append(path)
    unused = tuple(r for i, r in enumerate(rules) if i not in used)
    if warn and unused:
        warnings.warn(
            f"quantize_params: rules matched no kernel: {[r.pattern for r in unused]}. Check the "
            "patterns against the module paths (report.unmatched_paths lists the unmatched ones).",
            stacklevel=2,
        )
    report = QuantReport(matched, tuple(quantized), tuple(unmatched), unused, rules)
    return traverse_util.unflatten_dict(new), report


def _as_dict(tree):
    if isinstance(tree, Mapping):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


def _axes_for(spec, path, shape, leaf_name="kernel") -> tuple[int, ...]:
    if callable(spec):
        return tuple(spec(path, shape))
    if spec is None or (leaf_name == "embedding" and path not in spec):
        return (1,) if leaf_name == "embedding" else (0,)
    if path not in spec:
        raise ValueError(f"contracting_axes has no entry for {path!r}; known: {sorted(spec)[:8]}.")
    return tuple(spec[path])


def param_bytes(tree: Any) -> int:
    """Storage of a param tree: ``QArray.nbytes`` for quantized leaves, ``size * itemsize`` else.

    Works on concrete arrays and on ``jax.eval_shape`` results alike.
    """
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QArray)):
        if isinstance(leaf, QArray):
            total += leaf.nbytes
        else:
            total += int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
    return total


# --- running plain linen models on quantized params ---------------------------------------------


def _einsum_axes(eq: str):
    """``(lhs contracting axes, rhs contracting axes)`` of a two-operand einsum string."""
    eq = eq.replace(" ", "")
    ins, out = eq.split("->")
    la, ra = ins.split(",")
    labels = [c for c in ra if c in la and c not in out]
    return tuple(la.index(c) for c in labels), tuple(ra.index(c) for c in labels)


def _dense_general_axes(mod, ndim: int):
    axis = mod.axis if isinstance(mod.axis, Sequence) else (mod.axis,)
    if mod.batch_dims:
        raise ValueError(f"{module_path(mod)}: DenseGeneral with batch_dims is not supported.")
    return tuple(a % ndim for a in axis)


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
                n = len(_dense_general_axes(mod, jnp.ndim(args[0])))
                found[module_path(mod)] = tuple(range(n))
            elif isinstance(mod, nn.Einsum):
                eq = args[1] if len(args) > 1 and args[1] is not None else mod.einsum_str
                found[module_path(mod)] = _einsum_axes(eq)[1]
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
            eq = args[1] if len(args) > 1 and args[1] is not None else mod.einsum_str
            y = einsum(eq, x, kernel, config=config)
            if bias is not None:
                _, bshape = mod._get_bias_shape(eq.replace(" ", ""), x, kernel)
                y = y + jnp.reshape(bias, bshape)
            return y
        if isinstance(mod, nn.Dense):
            xc = (x.ndim - 1,)
        else:
            xc = _dense_general_axes(mod, x.ndim)
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


def gather_rows(q: QArray, idx: jax.Array) -> QArray:
    """Rows ``idx`` of a QArray quantized with a scale per row (``channel_axes == (0,)``).

    Returns a QArray of shape ``[*idx.shape, *q.shape[1:]]`` (the codes stay packed).
    """
    if q.channel_axes[:1] != (0,) or q.pack_axis == 0 or q.group_axis == 0:
        raise ValueError(
            f"gather_rows needs a QArray with a scale per row (channel axis 0, not packed or "
            f"grouped along it); got channel_axes={q.channel_axes}, pack_axis={q.pack_axis}, "
            f"group_axis={q.group_axis}."
        )
    n = jnp.ndim(idx)
    shift = lambda a: None if a is None else a + n - 1
    take = lambda a: None if a is None else jnp.take(a, idx, axis=0)
    return QArray(
        qvalue=take(q.qvalue),
        scale=take(q.scale),
        zero_point=take(q.zero_point),
        qtype=q.qtype,
        shape=tuple(jnp.shape(idx)) + tuple(q.shape[1:]),
        dtype=q.dtype,
        channel_axes=tuple(range(n)) + tuple(shift(a) for a in q.channel_axes[1:]),
        group_axis=shift(q.group_axis),
        group_size=q.group_size,
        pack_axis=shift(q.pack_axis),
    )
