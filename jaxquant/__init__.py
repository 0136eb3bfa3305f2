"""jaxquant: quantization research for large language models in JAX.

The core (formats, specs, QArray, quantize, the quantized dot_general) is pure JAX and needs no
Flax: ``import jaxquant as jq``. Building blocks below this surface (``resolve_layout``,
``operand_spec``, ``quantize_operand``, ``check_finite``, ``gather_rows``, the ``QTYPES``
registry) are importable from :mod:`jaxquant.core`.
"""

__version__ = "0.1.0"

from jaxquant.core import BackwardSpec as BackwardSpec
from jaxquant.core import DotGeneralConfig as DotGeneralConfig
from jaxquant.core import DoubleQuantArray as DoubleQuantArray
from jaxquant.core import Layout as Layout
from jaxquant.core import QArray as QArray
from jaxquant.core import QKind as QKind
from jaxquant.core import QType as QType
from jaxquant.core import QuantSpec as QuantSpec
from jaxquant.core import calibrate as calibrate
from jaxquant.core import compute_scale as compute_scale
from jaxquant.core import dequantize as dequantize
from jaxquant.core import dot_general as dot_general
from jaxquant.core import dot_general_reference as dot_general_reference
from jaxquant.core import double_quantize as double_quantize
from jaxquant.core import einsum as einsum
from jaxquant.core import fake_quant as fake_quant
from jaxquant.core import fp8 as fp8
from jaxquant.core import fully_quantized as fully_quantized
from jaxquant.core import get_qtype as get_qtype
from jaxquant.core import lsq_fake_quant as lsq_fake_quant
from jaxquant.core import lsq_init_scale as lsq_init_scale
from jaxquant.core import make_dot_general as make_dot_general
from jaxquant.core import pack as pack
from jaxquant.core import quantize as quantize
from jaxquant.core import unpack as unpack
from jaxquant.core import w4a8 as w4a8
from jaxquant.core import w8a8 as w8a8
from jaxquant.core import weight_only as weight_only

# Public names that need Flax, resolved on first use (`jq.QuantRule`), so that `import jaxquant`
# stays pure JAX: name -> module that defines it.
_LAZY = {
    "AWQConfig": "jaxquant.ptq.any_model_scales",
    "BlockStack": "jaxquant.nn.block_stack",
    "QuantRule": "jaxquant.nn.rules",
    "SmoothQuantConfig": "jaxquant.ptq.any_model_scales",
    "calibrate_and_convert": "jaxquant.ptq.any_model",
    "quantize_blocks": "jaxquant.ptq.pipeline",
    "quantize_model": "jaxquant.nn.any_model",
    "to_serving": "jaxquant.nn.any_model",
}


def __getattr__(name):
    import importlib

    # `jq.checkpoint` is the Orbax checkpoint module; imported lazily so that the pure-JAX core
    # does not pull in Orbax.
    if name == "checkpoint":
        return importlib.import_module("jaxquant.checkpoint")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxquant' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
