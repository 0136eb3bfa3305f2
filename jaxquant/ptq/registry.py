"""The one registry of PTQ algorithms: recipe method name -> algorithm class.

A new algorithm is one file (a :class:`~jaxquant.ptq.algorithm.PTQAlgorithm` subclass) plus one
line here; the recipe parser, the driver and the command line's recipes pick it up.
"""

from __future__ import annotations

from jaxquant.ptq.algorithm import Float, PTQAlgorithm, compose
from jaxquant.ptq.awq import AWQ
from jaxquant.ptq.clip import Clip
from jaxquant.ptq.gptq import GPTQ
from jaxquant.ptq.rtn import RTN, W8A8
from jaxquant.ptq.smoothquant import SmoothQuant

ALGORITHMS: dict[str, type[PTQAlgorithm]] = {
    "fp32": Float,
    "rtn": RTN,
    "gptq": GPTQ,
    "awq": AWQ,
    "awq+gptq": compose(AWQ, GPTQ),
    "w8a8": W8A8,
    "smoothquant": SmoothQuant,
    "clip": Clip,
}

# Other spellings the recipe parser accepts.
ALIASES: dict[str, str] = {"float": "fp32", "none": "fp32", "sq": "smoothquant"}
