"""Quantization rules by module path: which layers get which config.

A :class:`QuantRule` pairs a regular expression on the ``'/'``-joined module path (e.g.
``"block_3/attn/q_proj"``) with a :class:`~jaxquant.core.dot_config.DotGeneralConfig`. The first
rule whose pattern matches (``re.search``; anchor with ``^``/``$`` for exact paths) decides;
a rule with ``config=None`` keeps the matched layers float.

Two ways to use them:

* inside jaxquant's own layers and :class:`~jaxquant.nn.Transformer` (rules in the config);
* on a plain linen model written with ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` /
  ``nn.Embed``: :func:`~jaxquant.nn.params.quantize_params` turns its float kernels into
  QArrays, and :func:`~jaxquant.nn.interceptor.quantized_interceptor` runs the model on them
  (through ``nn.intercept_methods``)::

      qparams, report = quantize_params(params, rules)
      with nn.intercept_methods(quantized_interceptor(rules)):
          y = model.apply({"params": qparams}, x)

Rules serialize to JSON and back (``to_dict`` / ``from_dict``, ``to_json`` / ``from_json``), so a
saved model keeps its rules.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence

import flax.linen as nn

from jaxquant.core.dot_config import DotGeneralConfig
from jaxquant.core.serialization import JsonConfig
from jaxquant.nn.modes import StaticActivation, static_activation_method


@dataclasses.dataclass(frozen=True)
class QuantRule(JsonConfig):
    """Quantize the layers whose module path matches ``pattern`` with ``config``.

    Attributes:
      pattern: regular expression searched in the ``'/'``-joined module path.
      config: the layer's :class:`DotGeneralConfig`, or None to keep it float.
      static_activation: None for dynamic activation scales (the config's), or a
        :class:`~jaxquant.nn.modes.StaticActivation` (``"absmax"`` / ``"percentile"``): serve
        with one static per-tensor activation scale calibrated in ``CALIBRATE`` mode (needs
        ``config.lhs`` without groups). TRAIN mode keeps dynamic scales (there are no
        statistics yet); CONVERT stores the scale and SERVE uses it. Stored as the enum.
      learned_scale: LSQ quantization-aware training (Esser et al. 2020): in TRAIN mode the
        layer keeps its weight scale as a trained param ``kernel_scale`` (the layout of the
        kernel QArray's ``scale``, initialised to the RTN scale of the kernel) and
        fake-quantizes the kernel with :func:`~jaxquant.core.lsq_fake_quant`; CONVERT packs the
        kernel on that learned grid. Needs ``config.rhs`` a symmetric ``int2`` .. ``int8`` spec
        with float32 scales (see :func:`check_learned_scale`). SERVE is unchanged.

    Example:
      >>> rules = (QuantRule(r"lm_head", None), QuantRule(r"block_\\d+/", w8a8()))
      >>> QuantRule.from_json(rules[1].to_json()) == rules[1]
      True
    """

    pattern: str
    config: DotGeneralConfig | None
    static_activation: StaticActivation | None = dataclasses.field(default=None, kw_only=True)
    learned_scale: bool = dataclasses.field(default=False, kw_only=True)

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
        static = static_activation_method(self.static_activation, self.config)
        object.__setattr__(self, "static_activation", static)
        check_learned_scale(self.learned_scale, self.config, f"rule {self.pattern!r}")

    @classmethod
    def _decoders(cls):
        return {"config": DotGeneralConfig.from_dict}

    def to_dict(self) -> dict:
        """One key per field, except ``learned_scale`` when False (so rules without LSQ save
        as before it existed, and older readers still read them)."""
        d = super().to_dict()
        if not self.learned_scale:
            del d["learned_scale"]
        return d

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


def match_rule(rules: Sequence[QuantRule], path: str) -> tuple[int, QuantRule] | None:
    """The first rule matching ``path`` and its index, or None."""
    for i, r in enumerate(rules):
        if r.matches(path):
            return i, r
    return None


def config_for(
    rules: Sequence[QuantRule], path: str
) -> tuple[DotGeneralConfig | None, StaticActivation | None]:
    """``(config, static_activation)`` of the first rule matching ``path``; ``(None, None)``."""
    m = match_rule(rules, path)
    if m is None:
        return None, None
    return m[1].config, m[1].static_activation


def learned_scale_for(rules: Sequence[QuantRule], path: str) -> bool:
    """``learned_scale`` of the first rule matching ``path`` (False when none matches)."""
    m = match_rule(rules, path)
    return m is not None and m[1].learned_scale


def check_learned_scale(learned_scale: bool, config: DotGeneralConfig | None, where: str) -> None:
    """Raises unless ``learned_scale`` is False, or ``config.rhs`` is a grid LSQ can learn:
    symmetric ``int2`` .. ``int8``, nearest rounding, float32 scales not rounded to float16
    (so the trained grid is exactly the one CONVERT stores). ``where`` names the rule or layer.
    """
    if not isinstance(learned_scale, bool):
        raise ValueError(f"{where}: learned_scale must be True or False, got {learned_scale!r}.")
    if not learned_scale:
        return
    spec = config.rhs if config is not None else None
    if spec is None:
        raise ValueError(f"{where}: learned_scale=True needs a config that quantizes the "
                         "weights (config.rhs); drop learned_scale for a float layer.")
    if not (spec.qt.has_full_range and spec.symmetric):
        raise ValueError(f"{where}: learned_scale (LSQ) needs a symmetric int2..int8 weight "
                         f"format, got {spec.qtype} (symmetric={spec.symmetric}); use e.g. "
                         "int4, or drop learned_scale.")
    if spec.rounding != "nearest" or spec.fp16_scales or spec.scale_dtype != "float32":
        raise ValueError(f"{where}: learned_scale (LSQ) needs nearest rounding and float32 "
                         f"scales, got rounding={spec.rounding!r}, "
                         f"fp16_scales={spec.fp16_scales}, scale_dtype={spec.scale_dtype!r}.")


def module_path(module: nn.Module, child: str | None = None) -> str:
    """The ``'/'``-joined path of a bound module (plus ``child``), as the rules see it."""
    parts = tuple(module.path) + ((child,) if child else ())
    return "/".join(str(p) for p in parts)


def check_rules(rules: QuantRule | Sequence[QuantRule]) -> tuple[QuantRule, ...]:
    """``rules`` as a tuple (one rule is accepted as is).

    Raises:
      ValueError: for an element that is not a :class:`QuantRule`.
    """
    if isinstance(rules, QuantRule):
        rules = (rules,)
    rules = tuple(rules)
    for r in rules:
        if not isinstance(r, QuantRule):
            raise ValueError(
                f"rules must be QuantRule objects, got {type(r).__name__}: build them as "
                "jq.QuantRule(pattern, config)."
            )
    return rules


def warn_unused_rules(rules: Sequence[QuantRule], weight_paths) -> None:
    """A ``UserWarning`` for rules that are the first match of no weight-holding layer (a typo
    in a pattern, or a rule shadowed by an earlier one)."""
    weight_paths = list(weight_paths)
    used = {m[0] for p in weight_paths if (m := match_rule(rules, p)) is not None}
    unused = [r.pattern for i, r in enumerate(rules) if i not in used]
    if unused:
        warnings.warn(
            f"quantize_model: rules matched no layer: {unused}. Layer paths: "
            f"{sorted(weight_paths)[:12]}.",
            stacklevel=4,
        )
