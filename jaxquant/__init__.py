"""jaxquant: quantization research for large language models in JAX.

The core (formats, specs, QArray, quantize, the quantized dot_general) is pure JAX and needs no
Flax: ``import jaxquant as jq``.
"""

__version__ = "0.1.0"

from jaxquant.core import Layout as Layout
from jaxquant.core import QArray as QArray
from jaxquant.core import QTYPES as QTYPES
from jaxquant.core import QType as QType
from jaxquant.core import QuantSpec as QuantSpec
from jaxquant.core import calibrate as calibrate
from jaxquant.core import check_finite as check_finite
from jaxquant.core import compute_scale as compute_scale
from jaxquant.core import dequantize as dequantize
from jaxquant.core import fake_quant as fake_quant
from jaxquant.core import get_qtype as get_qtype
from jaxquant.core import lsq_fake_quant as lsq_fake_quant
from jaxquant.core import lsq_init_scale as lsq_init_scale
from jaxquant.core import pack as pack
from jaxquant.core import quantize as quantize
from jaxquant.core import resolve_layout as resolve_layout
from jaxquant.core import unpack as unpack
