"""Pure-JAX quantization primitives: formats, specs, calibration, QArray, packing, dot_general.

Everything here is importable from ``jaxquant.core``; the most used names are also re-exported
at the top level (``import jaxquant as jq``). The building blocks below the top level
(``resolve_layout``, ``operand_spec``, ``quantize_operand``, ``check_finite``, ``gather_rows``,
the ``QTYPES`` registry, ...) live only here.
"""

from jaxquant.core.calibration import calibrate, compute_scale, dequantize_codes, quantize_codes
from jaxquant.core.einsum_spec import EinsumSpec, parse_einsum
from jaxquant.core.fake_quant import fake_quant, lsq_fake_quant, lsq_init_scale
from jaxquant.core.packing import pack, unpack
from jaxquant.core.qarray import QArray, check_finite, dequantize, gather_rows, quantize
from jaxquant.core.qtypes import QTYPES, QKind, QType, get_qtype
from jaxquant.core.spec import Layout, QuantSpec, resolve_layout

__all__ = [
    "EinsumSpec",
    "Layout",
    "QArray",
    "QKind",
    "QTYPES",
    "QType",
    "QuantSpec",
    "calibrate",
    "check_finite",
    "compute_scale",
    "dequantize",
    "dequantize_codes",
    "fake_quant",
    "gather_rows",
    "get_qtype",
    "lsq_fake_quant",
    "lsq_init_scale",
    "pack",
    "parse_einsum",
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
    w4a8,
    w8a8,
    weight_only,
)
from jaxquant.core.dot_general import (  # noqa: E402
    dot_general,
    dot_general_reference,
    einsum,
    make_dot_general,
    operand_spec,
    quantize_operand,
)
from jaxquant.core.double_quant import DoubleQuantArray, double_quantize  # noqa: E402
from jaxquant.core.sharding import ShardingError, local_qarray, qarray_partition_specs  # noqa: E402

__all__ += [
    "DoubleQuantArray",
    "double_quantize",
    "ShardingError",
    "local_qarray",
    "qarray_partition_specs",
    "BackwardSpec",
    "DotGeneralConfig",
    "dot_general",
    "dot_general_reference",
    "einsum",
    "fp8",
    "fully_quantized",
    "make_dot_general",
    "operand_spec",
    "quantize_operand",
    "w4a8",
    "w8a8",
    "weight_only",
]
