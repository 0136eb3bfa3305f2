"""RTN: round every weight to the nearest point of its grid; no calibration data.

The scale of each output channel (or group of ``group_size`` inputs) comes from the weights
alone: absmax on the full-range grid (``:narrow``: ``-qmax..qmax``), min/max with ``asym``,
mean |w| for ``ternary`` / ``binary``, or the MSE clip search with ``:mse``. ``w8a8`` is RTN
int8 weights served with dynamically quantized int8 activations.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from jaxquant.core.dot_general import quantize_operand
from jaxquant.ptq.algorithm import PTQAlgorithm

# One compiled program per kernel shape and spec (eager dispatch is ~5x slower on SmolLM2's 210
# kernels); the codes and scales equal eager ``quantize_operand``'s and ``convert``'s.
_quantize = jax.jit(quantize_operand, static_argnums=(1, 2))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTN(PTQAlgorithm):
    """Round to nearest: ``quantize_operand(kernel, spec, (0,))``, what ``convert`` does."""

    def quantize_linear(self, kernel, spec, inputs, *, site, linear):
        del inputs, site, linear
        return _quantize(kernel, spec, (0,))


@dataclasses.dataclass(frozen=True, kw_only=True)
class W8A8(RTN):
    """RTN int8 weights, int8 activations quantized per token at run time."""

    activations: ClassVar[bool] = True
