"""Post-training quantization: RTN, GPTQ, AWQ, SmoothQuant, layer by layer or for a whole model.

``quantize_model(cfg, params, parse_recipe("gptq:int4:g128"), calib_tokens)`` returns serving
params for ``Transformer(serve_cfg, QuantMode.SERVE)``; the layer-level algorithms work on any
kernel ``[d_in, d_out]`` and its input statistics. Each algorithm is one file implementing
:class:`PTQAlgorithm`, registered by its recipe method in :data:`ALGORITHMS`.
:func:`calibrate_and_convert` is GPTQ (or AWQ, AWQ+GPTQ, SmoothQuant: the configs in
:mod:`jaxquant.ptq.any_model_scales`) for any model ``jq.quantize_model`` handles (linen or
NNX; Dense, DenseGeneral, Einsum, Conv).
"""

from jaxquant.ptq.algorithm import PTQAlgorithm as PTQAlgorithm
from jaxquant.ptq.algorithm import SiteInputs as SiteInputs
from jaxquant.ptq.algorithm import Stat as Stat
from jaxquant.ptq.algorithm import compose as compose
from jaxquant.ptq.algorithm import effective_group as effective_group
from jaxquant.ptq.any_model import calibrate_and_convert as calibrate_and_convert
from jaxquant.ptq.any_model_scales import AWQConfig as AWQConfig
from jaxquant.ptq.any_model_scales import SmoothQuantConfig as SmoothQuantConfig
from jaxquant.ptq.awq import AWQ as AWQ
from jaxquant.ptq.awq import clip_quantize as clip_quantize
from jaxquant.ptq.awq import search_scale as search_scale
from jaxquant.ptq.folding import fold_into_linear as fold_into_linear
from jaxquant.ptq.folding import fold_into_norm as fold_into_norm
from jaxquant.ptq.folding import fold_scales as fold_scales
from jaxquant.ptq.gptq import GPTQ as GPTQ
from jaxquant.ptq.gptq import GPTQConfig as GPTQConfig
from jaxquant.ptq.gptq import gptq_quantize as gptq_quantize
from jaxquant.ptq.hessian import InputStats as InputStats
from jaxquant.ptq.hessian import hessian as hessian
from jaxquant.ptq.hessian import stats_init as stats_init
from jaxquant.ptq.hessian import stats_update as stats_update
from jaxquant.ptq.options import PTQOptions as PTQOptions
from jaxquant.ptq.pipeline import layer_group_sizes as layer_group_sizes
from jaxquant.ptq.pipeline import quantize_blocks as quantize_blocks
from jaxquant.ptq.pipeline import quantize_model as quantize_model
from jaxquant.ptq.pipeline import serving_config as serving_config
from jaxquant.ptq.recipe import Recipe as Recipe
from jaxquant.ptq.recipe import parse_recipe as parse_recipe
from jaxquant.ptq.registry import ALGORITHMS as ALGORITHMS
from jaxquant.ptq.rtn import RTN as RTN
from jaxquant.ptq.smoothquant import SmoothQuant as SmoothQuant
from jaxquant.ptq.smoothquant import search_alpha as search_alpha
from jaxquant.ptq.smoothquant import smooth_scales as smooth_scales
