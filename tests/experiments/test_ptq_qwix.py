"""experiments/ptq_qwix.py: the pure helpers (no Qwix needed) that fix the compared settings."""

from __future__ import annotations

import re

import jax.numpy as jnp
import pytest

from jaxquant.nn.config import TransformerConfig
from jaxquant.nn.transformer import block_sites
from jaxquant.ptq.recipe import parse_recipe
from tests.experiments.helpers import load_experiment


@pytest.fixture(scope="module")
def ptq_qwix():
    return load_experiment("ptq_qwix")


def test_groups_follow_the_pipeline_on_smollm2(ptq_qwix):
    groups = ptq_qwix.layer_groups(TransformerConfig.smollm2_135m(), 128)
    assert set(groups) == set(block_sites(TransformerConfig.smollm2_135m()).linears)
    # 576 inputs are not a multiple of 128: 96 (as jaxquant's pipeline); 1536 inputs keep 128.
    assert groups.pop("mlp/down_proj") == 128
    assert set(groups.values()) == {96}


def test_every_projection_matches_exactly_one_rule_with_its_group(ptq_qwix):
    cfg = TransformerConfig.smollm2_135m()
    recipe = parse_recipe("gptq:int4:g128")
    specs = ptq_qwix.qwix_rule_specs(cfg, recipe)
    groups = ptq_qwix.layer_groups(cfg, 128)
    for lin in block_sites(cfg).linears:
        for i in (0, 29):
            path = f"block_{i}/{lin}"
            hits = [s for s in specs if re.fullmatch(s["module_path"], path)]
            assert len(hits) == 1, path
            assert hits[0]["tile_size"] == groups[lin]
            assert hits[0]["weight_qtype"] == jnp.int4
            assert hits[0]["weight_calibration_method"] == "absmax"
    for other in ("embed", "final_norm", "block_0/attn", "block_0/attn_norm"):
        assert not any(re.fullmatch(s["module_path"], other) for s in specs)


def test_qtype_and_asymmetric_mapping(ptq_qwix):
    cfg = TransformerConfig.tiny()
    (spec,) = ptq_qwix.qwix_rule_specs(cfg, parse_recipe("gptq:int3:g32:asym"))
    assert spec["weight_qtype"] == "int3"  # Qwix's synthetic type name
    assert spec["weight_calibration_method"] == "minmax"
    assert spec["tile_size"] == 32
    (spec,) = ptq_qwix.qwix_rule_specs(cfg, parse_recipe("gptq:int8"))
    assert spec["weight_qtype"] == jnp.int8 and spec["tile_size"] is None


def test_markdown_table(ptq_qwix):
    rows = [
        {"recipe": "fp32", "method": "fp32", "perplexity": 20.0, "quantize_seconds": 0.0},
        {
            "recipe": "gptq:int4:g128",
            "method": "qwix gptq",
            "perplexity": 21.0,
            "delta": 1.0,
            "delta_pct": 5.0,
            "quantize_seconds": 12.5,
        },
        {"recipe": "gptq:int3:g128", "method": "qwix gptq", "error": "TypeError: int3"},
    ]
    lines = ptq_qwix.markdown_table(rows).splitlines()
    assert len(lines) == 5
    assert "| 21.000 | +1.000 (+5.00%) | 12.5 |" in lines[3]
    assert "unsupported" in lines[4]


def test_merge_replaces_rows_and_stamps_commits(ptq_qwix):
    def result(commit, rows):
        return {
            "model": "tiny",
            "settings": {"eval": 1},
            "rows": rows,
            "environment": {"jaxquant_commit": commit, "jaxquant_dirty": False},
        }

    old = result(
        "aaa",
        [
            {"recipe": "fp32", "method": "fp32", "perplexity": 2.0},
            {"recipe": "g", "method": "qwix gptq", "perplexity": 3.0},
            {"recipe": "g", "method": "jaxquant gptq", "perplexity": 4.0},
        ],
    )
    new = result(
        "bbb",
        [
            {"recipe": "g", "method": "jaxquant gptq", "perplexity": 2.5},
            {"recipe": "h", "method": "jaxquant gptq", "perplexity": 5.0},
        ],
    )
    merged = ptq_qwix.merge(old, new)
    got = [(r["method"], r["perplexity"], r["jaxquant_commit"]) for r in merged["rows"]]
    assert got == [
        ("fp32", 2.0, "aaa"),
        ("qwix gptq", 3.0, "aaa"),
        ("jaxquant gptq", 2.5, "bbb"),
        ("jaxquant gptq", 5.0, "bbb"),
    ]
    assert len(merged["environments"]) == 2
    assert [r["perplexity"] for r in merged["replaced_rows"]] == [4.0]
    with pytest.raises(ValueError, match="same model and settings"):
        ptq_qwix.merge(old, {**new, "settings": {"eval": 2}})
    # jaxquant's own GPTQ settings may differ between the runs: they are kept per row.
    newer = {**new, "settings": {"eval": 1, "jaxquant_gptq": {"act_order": True}}}
    rows = ptq_qwix.merge(old, newer)["rows"]
    assert rows[2]["jaxquant_gptq"] == {"act_order": True} and rows[1]["jaxquant_gptq"] is None
