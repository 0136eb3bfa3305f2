"""QuantRule and TransformerConfig to JSON and back, rules and attention configs included."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxquant.core.dot_config import DotGeneralConfig, fully_quantized, w8a8, weight_only
from jaxquant.core.spec import QuantSpec
from jaxquant.nn import QuantRule, StaticActivation, TransformerConfig
from tests.core.test_serialization import configs

rules = st.builds(
    QuantRule,
    pattern=st.sampled_from([r".*", r"^block_0/attn/q_proj$", r"(^|/)(embed|lm_head)$", "mlp/"]),
    config=st.none() | configs,
)


@given(rules)
def test_rule_round_trip_is_exact(rule):
    assert QuantRule.from_json(rule.to_json()) == rule
    assert QuantRule.from_dict(rule.to_dict()) == rule


def test_static_activation_is_one_enum():
    r = QuantRule("x", w8a8(), static_activation="percentile")
    assert r.static_activation is StaticActivation.PERCENTILE
    assert r.to_dict()["static_activation"] == "percentile"
    assert QuantRule.from_json(r.to_json()) == r
    assert r == QuantRule("x", w8a8(), static_activation=StaticActivation.PERCENTILE)


CUSTOM = (
    QuantRule(r"^block_0/attn/o_proj$", None),
    QuantRule(r"q_proj$", w8a8(), static_activation="absmax"),
    QuantRule(r"(^|/)block_\d+/(attn|mlp)/", weight_only("int4", 32, symmetric=False)),
    QuantRule(r"(^|/)embed$", weight_only("int8")),
)


def test_transformer_config_round_trip_is_exact():
    cfg = TransformerConfig.tiny(
        quant_rules=CUSTOM,
        attn_qk_config=fully_quantized(),
        attn_pv_config=DotGeneralConfig(lhs=QuantSpec(qtype="int8")),
        kv_cache_qtype="int4",
        dtype="bfloat16",
    )
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    back = TransformerConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg and hash(back) == hash(cfg)
    assert back.quant_rules[1].static_activation is StaticActivation.ABSMAX
    plain = TransformerConfig.smollm2_135m()
    assert TransformerConfig.from_dict(plain.to_dict()) == plain


def test_transformer_config_from_dict_still_takes_objects_and_rejects_typos():
    cfg = TransformerConfig.tiny()
    d = {**dataclasses.asdict(cfg), "quant_rules": CUSTOM}
    assert TransformerConfig.from_dict(d).quant_rules == CUSTOM
    with pytest.raises(ValueError, match="Unknown TransformerConfig keys"):
        TransformerConfig.from_dict({**cfg.to_dict(), "quant_rule": []})
