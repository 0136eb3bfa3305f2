"""Param trees under rules: quantize the kernels of a linen param tree, and count its bytes."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxquant.core import QArray
from jaxquant.core.dot_general import quantize_operand
from jaxquant.nn.rules import QuantRule, match_rule


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
        (``nn.Dense``, a single-input-axis ``nn.DenseGeneral``), ``(1,)`` for embeddings; else a
        ``{path: axes}`` mapping (see :func:`~jaxquant.nn.axes.infer_contracting_axes`) or a
        function ``(path, shape) -> axes``.
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
