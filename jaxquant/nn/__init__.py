"""Flax (linen) layers built on ``jaxquant.core``, and a quantizable LLaMA transformer.

Train -> convert -> serve::

    model = Transformer(TransformerConfig.tiny().with_quantization(w8a8()))
    params = model.init(key, tokens)["params"]           # float params, TRAIN mode = QAT
    serve_params = convert(model, params)                # QArray kernels, no float copies
    logits = Transformer(model.cfg, mode=QuantMode.SERVE).apply({"params": serve_params}, tokens)
"""

from jaxquant.nn.any_model import read_rules as read_rules
from jaxquant.nn.any_model import restore_serving as restore_serving
from jaxquant.nn.any_model import save_serving as save_serving
from jaxquant.nn.any_model import to_serving as to_serving
from jaxquant.nn.attention import Attention as Attention
from jaxquant.nn.attention import attend as attend
from jaxquant.nn.axes import infer_contracting_axes as infer_contracting_axes
from jaxquant.nn.block_stack import BlockStack as BlockStack
from jaxquant.nn.config import TransformerConfig as TransformerConfig
from jaxquant.nn.decode import decode_step as decode_step
from jaxquant.nn.decode import generate as generate
from jaxquant.nn.decode import prefill as prefill
from jaxquant.nn.decode import sample as sample
from jaxquant.nn.interceptor import quantized_interceptor as quantized_interceptor
from jaxquant.nn.kv_cache import KVCache as KVCache
from jaxquant.nn.kv_cache import LayerKVCache as LayerKVCache
from jaxquant.nn.kv_cache import init_kv_cache as init_kv_cache
from jaxquant.nn.kv_cache import kv_cache_bytes as kv_cache_bytes
from jaxquant.nn.linear import QDense as QDense
from jaxquant.nn.linear import QDenseGeneral as QDenseGeneral
from jaxquant.nn.linear import QEinsum as QEinsum
from jaxquant.nn.linear import QEmbed as QEmbed
from jaxquant.nn.linear import init_learned_scales as init_learned_scales
from jaxquant.nn.mesh import make_mesh as make_mesh
from jaxquant.nn.mesh import param_shardings as param_shardings
from jaxquant.nn.mesh import shard_params as shard_params
from jaxquant.nn.modes import ActStats as ActStats
from jaxquant.nn.modes import QuantMode as QuantMode
from jaxquant.nn.modes import StaticActivation as StaticActivation
from jaxquant.nn.modes import act_stats_init as act_stats_init
from jaxquant.nn.modes import act_stats_update as act_stats_update
from jaxquant.nn.modes import calibrate_model as calibrate_model
from jaxquant.nn.modes import convert as convert
from jaxquant.nn.modes import static_scale as static_scale
from jaxquant.nn.params import QuantReport as QuantReport
from jaxquant.nn.params import param_bytes as param_bytes
from jaxquant.nn.params import quantize_params as quantize_params
from jaxquant.nn.rope import adjacent_to_half as adjacent_to_half
from jaxquant.nn.rope import apply_rope as apply_rope
from jaxquant.nn.rope import half_to_adjacent as half_to_adjacent
from jaxquant.nn.rules import QuantRule as QuantRule
from jaxquant.nn.rules import match_rule as match_rule
from jaxquant.nn.sites import Site as Site
from jaxquant.nn.sites import SiteTable as SiteTable
from jaxquant.nn.transformer import MLP as MLP
from jaxquant.nn.transformer import Block as Block
from jaxquant.nn.transformer import RMSNorm as RMSNorm
from jaxquant.nn.transformer import Transformer as Transformer
from jaxquant.nn.transformer import TransformerStack as TransformerStack
from jaxquant.nn.transformer import block_sites as block_sites
from jaxquant.nn.transformer import serving_param_bytes as serving_param_bytes
from jaxquant.nn.transformer import serving_params_shape as serving_params_shape
