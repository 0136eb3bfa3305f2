"""RTN: round every weight to the nearest point of its grid; no calibration data.

The scale of each output channel (or group of ``group_size`` inputs) comes from the weights
alone (absmax, min/max with ``asym``, or the MSE clip search with ``:mse``). ``w8a8`` is RTN
int8 weights served with dynamically quantized int8 activations.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxquant.core.dot_general import quantize_operand
from jaxquant.ptq.algorithm import PTQAlgorithm


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTN(PTQAlgorithm):
    """Round to nearest: ``quantize_operand(kernel, spec, (0,))``, what ``convert`` does."""

    def quantize_linear(self, kernel, spec, inputs, *, site, linear):
        del inputs, site, linear
        return quantize_operand(kernel, spec, (0,))


@dataclasses.dataclass(frozen=True, kw_only=True)
class W8A8(RTN):
    """RTN int8 weights, int8 activations quantized per token at run time."""

    activations: ClassVar[bool] = True
