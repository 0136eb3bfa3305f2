"""A quantized model saved with its rules restores without a recipe and gives the same logits."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.core import QArray
from jaxquant.core.dot_config import weight_only
from jaxquant.models.saved import SIDECAR, load_quantized, save_quantized
from jaxquant.nn import QuantMode, QuantRule, Transformer, TransformerConfig, convert
from jaxquant.ptq import parse_recipe, serving_config
from tests.nn.helpers import fwd, random_params

TOKENS = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]], jnp.int32)


def test_custom_rules_round_trip(tmp_path):
    # int8 for q_proj, asymmetric int4 g32 elsewhere in the blocks, block 1's up_proj float.
    rules = (
        QuantRule(r"q_proj$", weight_only("int8")),
        QuantRule(r"^block_1/mlp/up_proj$", None),
        QuantRule(r"(^|/)block_\d+/(attn|mlp)/", weight_only("int4", 32, symmetric=False)),
    )
    cfg = TransformerConfig.tiny(quant_rules=rules)
    params = random_params(cfg)
    serve_params = convert(Transformer(cfg), params)
    assert not isinstance(serve_params["block_1"]["mlp"]["up_proj"]["kernel"], QArray)
    assert serve_params["block_0"]["attn"]["q_proj"]["kernel"].qtype == "int8"
    assert serve_params["block_0"]["mlp"]["up_proj"]["kernel"].qtype == "int4"
    save_quantized(tmp_path / "ckpt", cfg, serve_params, {"model": "tiny"})

    cfg2, params2, sidecar = load_quantized(tmp_path / "ckpt")
    assert cfg2 == cfg and sidecar["recipe"] is None
    served = Transformer(cfg, mode=QuantMode.SERVE)
    y = fwd(served, serve_params, TOKENS)
    y2 = fwd(Transformer(cfg2, mode=QuantMode.SERVE), params2, TOKENS)
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))  # same codes, same program


def test_format_1_sidecar_still_reads(tmp_path):
    """Sidecars written before the rules were stored rebuild them from the recipe."""
    base = TransformerConfig.tiny()
    cfg = serving_config(base, parse_recipe("rtn:int4:g32"))
    serve_params = convert(Transformer(cfg), random_params(cfg))
    save_quantized(tmp_path / "ckpt", cfg, serve_params, {"recipe": "rtn:int4:g32"})
    side = tmp_path / "ckpt" / SIDECAR
    old = json.loads(side.read_text())
    skip = ("quant_rules", "attn_qk_config", "attn_pv_config")
    old["format"] = 1
    old["transformer_config"] = {k: v for k, v in dataclasses.asdict(base).items() if k not in skip}
    side.write_text(json.dumps(old))
    cfg2, _, _ = load_quantized(tmp_path / "ckpt")
    assert cfg2 == cfg


def test_unknown_format_is_refused(tmp_path):
    cfg = TransformerConfig.tiny()
    save_quantized(tmp_path / "ckpt", cfg, random_params(cfg), {"recipe": None})
    side = tmp_path / "ckpt" / SIDECAR
    side.write_text(json.dumps({**json.loads(side.read_text()), "format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        load_quantized(tmp_path / "ckpt")
