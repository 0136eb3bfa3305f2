"""Clip: round to nearest after AWQ's clip search, without AWQ's scales.

Per output column and group, the range shrinks by the ratio (of 20 in ``(0.5, 1]``) that
minimises the *output* error ``(x_g . (Q(w_g) - w_g))^2`` on sampled calibration tokens
(:func:`~jaxquant.ptq.awq.clip_quantize`). Ratio 1 is plain RTN, so on those tokens it is
never worse than RTN. The smallest real PTQ plugin: it asks for a sample of each site's inputs
and quantizes one linear; the driver does the rest.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxquant.ptq.algorithm import PTQAlgorithm, Stat
from jaxquant.ptq.awq import clip_quantize


@dataclasses.dataclass(frozen=True, kw_only=True)
class Clip(PTQAlgorithm):
    """RTN with an output-error clip search per group (recipe ``clip:int4:g128``)."""

    int_only: ClassVar[bool] = True

    @property
    def needs(self):
        return frozenset({Stat.SAMPLE})

    def quantize_linear(self, kernel, spec, inputs, *, site, linear):
        return clip_quantize(inputs.sample(), kernel, spec)
