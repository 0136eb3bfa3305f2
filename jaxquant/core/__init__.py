"""Pure-JAX quantization primitives: formats, specs, calibration, QArray, packing, dot_general."""

from jaxquant.core.calibration import calibrate, compute_scale, dequantize_codes, quantize_codes
from jaxquant.core.fake_quant import fake_quant, lsq_fake_quant, lsq_init_scale
from jaxquant.core.packing import pack, unpack
from jaxquant.core.qarray import QArray, check_finite, dequantize, quantize
from jaxquant.core.qtypes import QTYPES, QType, get_qtype
from jaxquant.core.spec import Layout, QuantSpec, resolve_layout

__all__ = [
    "Layout",
    "QArray",
    "QTYPES",
    "QType",
    "QuantSpec",
    "calibrate",
    "check_finite",
    "compute_scale",
    "dequantize",
    "dequantize_codes",
    "fake_quant",
    "get_qtype",
    "lsq_fake_quant",
    "lsq_init_scale",
    "pack",
    "quantize",
    "quantize_codes",
    "resolve_layout",
    "unpack",
]

from jaxquant.core.dot_config import (  # noqa: E402
    BackwardSpec,
    DotGeneralConfig,
    fp8,
    fully_quantized,
    w8a8,
    weight_only,
)
from jaxquant.core.dot_general import (  # noqa: E402
    QuantizedDotGeneral,
    dot_general,
    dot_general_cls,
    dot_general_reference,
    einsum,
    make_dot_general,
    operand_spec,
    quantize_operand,
)

__all__ += [
    "BackwardSpec",
    "DotGeneralConfig",
    "QuantizedDotGeneral",
    "dot_general",
    "dot_general_cls",
    "dot_general_reference",
    "einsum",
    "fp8",
    "fully_quantized",
    "make_dot_general",
    "operand_spec",
    "quantize_operand",
    "w8a8",
    "weight_only",
]
