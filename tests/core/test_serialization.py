"""QuantSpec / BackwardSpec / DotGeneralConfig to JSON and back: exact round trips."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxquant as jq
from jaxquant.core.dot_config import TILING_MODES
from jaxquant.core.qtypes import QTYPES, QKind


@st.composite
def operand_specs(draw):
    """Specs as a DotGeneralConfig takes them (no axes); every other field drawn."""
    qtype = draw(st.sampled_from(sorted(QTYPES)))
    is_int = QTYPES[qtype].kind is QKind.INT
    return jq.QuantSpec(
        qtype=qtype,
        group_size=draw(st.none() | st.integers(1, 512)),
        # ternary and binary are symmetric-only ints (their own code sets)
        symmetric=draw(st.booleans()) if is_int and QTYPES[qtype].codes is None else True,
        calibration=draw(st.sampled_from(["absmax", "minmax", "percentile", "mse"])),
        percentile=draw(st.floats(50.0, 100.0, exclude_min=True)),
        mse_grid=draw(st.integers(1, 64)),
        mse_min_ratio=draw(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)),
        rounding=draw(st.sampled_from(["nearest", "stochastic"])) if is_int else "nearest",
        scale_dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
    )


@st.composite
def quant_specs(draw):
    """Specs with channel / group axes too."""
    spec = draw(operand_specs())
    axes = tuple(draw(st.lists(st.integers(-4, 3), max_size=3, unique=True)))
    group_axis = None
    if spec.group_size is not None:
        group_axis = draw(st.none() | st.integers(-4, 3).filter(lambda a: a not in axes))
    return dataclasses.replace(spec, channel_axes=axes, group_axis=group_axis)


backward_specs = st.none() | st.builds(
    jq.BackwardSpec, grad=st.none() | operand_specs(), operand=st.none() | operand_specs()
)
configs = st.builds(
    jq.DotGeneralConfig,
    lhs=st.none() | operand_specs(),
    rhs=st.none() | operand_specs(),
    dlhs=backward_specs,
    drhs=backward_specs,
    int_dot=st.booleans(),
    seed=st.integers(-(2**63), 2**63 - 1),
    tiling=st.sampled_from(TILING_MODES),
)


@given(quant_specs())
def test_quant_spec_round_trip_is_exact(spec):
    d = spec.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-safe: lists, not tuples
    assert jq.QuantSpec.from_dict(d) == spec
    back = jq.QuantSpec.from_json(spec.to_json())
    assert back == spec and hash(back) == hash(spec)
    assert isinstance(back.channel_axes, tuple)


@given(configs)
def test_dot_general_config_round_trip_is_exact(cfg):
    back = jq.DotGeneralConfig.from_json(cfg.to_json())
    assert back == cfg and hash(back) == hash(cfg)
    assert jq.DotGeneralConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "cfg",
    [jq.w8a8(), jq.weight_only("nf4", 64), jq.fully_quantized(), jq.fp8(), jq.DotGeneralConfig()],
    ids=["w8a8", "nf4", "fully_quantized", "fp8", "float"],
)
def test_presets_round_trip(cfg):
    assert jq.DotGeneralConfig.from_json(cfg.to_json()) == cfg


def test_dict_layout_is_plain_json():
    d = jq.fully_quantized().to_dict()
    assert d["dlhs"]["grad"]["rounding"] == "stochastic"
    assert d["lhs"]["qtype"] == "int8" and d["lhs"]["channel_axes"] == []
    # Omitted keys take the defaults; a dtype qtype is stored by its canonical name.
    assert jq.QuantSpec.from_dict({"qtype": "int4"}) == jq.QuantSpec(qtype="int4")
    assert jq.QuantSpec(qtype=jnp.int4).to_dict()["qtype"] == "int4"


def test_bad_dicts_raise():
    with pytest.raises(ValueError, match="Unknown QuantSpec keys"):
        jq.QuantSpec.from_dict({"qtype": "int8", "group_sise": 32})
    with pytest.raises(ValueError, match="expects a dict"):
        jq.DotGeneralConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match="Unknown DotGeneralConfig keys"):
        jq.DotGeneralConfig.from_dict({"lhs": None, "fwd": None})
    with pytest.raises(ValueError, match="qtype"):  # validation runs as in the constructor
        jq.DotGeneralConfig.from_dict({"rhs": {"qtype": "int9"}})
