"""Recipe strings parse into validated Recipes; bad ones say what is wrong."""

import pytest

from jaxquant.ptq.recipe import Recipe, parse_recipe


@pytest.mark.parametrize(
    "text,method,qtype,group,sym",
    [
        ("rtn:int8", "rtn", "int8", None, True),
        ("rtn:int4:g32:asym", "rtn", "int4", 32, False),
        ("gptq:int3:g128", "gptq", "int3", 128, True),
        ("awq:int4:g128", "awq", "int4", 128, True),
        ("w8a8", "w8a8", "int8", None, True),
        ("smoothquant", "smoothquant", "int8", None, True),
        ("gptq:int4:g128:a8", "gptq", "int4", 128, True),
    ],
)
def test_parse(text, method, qtype, group, sym):
    r = parse_recipe(text)
    assert (r.method, r.qtype, r.group_size, r.symmetric) == (method, qtype, group, sym)
    assert parse_recipe(r.name) == r


def test_dot_configs():
    assert parse_recipe("fp32").dot_config is None
    assert parse_recipe("w8a8").dot_config.lhs is not None
    cfg = parse_recipe("rtn:int4:g128").dot_config
    assert cfg.lhs is None and cfg.rhs.qtype == "int4" and cfg.rhs.group_size == 128
    # :a8 adds dynamic int8 activations (a scale per token) and leaves the weights as they were.
    a8 = parse_recipe("rtn:int4:g128:a8")
    assert a8.int8_activations and a8.name == "rtn:int4:g128:a8"
    assert a8.dot_config.rhs == cfg.rhs
    assert a8.dot_config.lhs.qtype == "int8" and a8.dot_config.lhs.channel_axes == ()
    assert parse_recipe("gptq:q4_0:a8").dot_config.rhs == parse_recipe("gptq:q4_0").dot_config.rhs


@pytest.mark.parametrize(
    "text,match",
    [
        ("foo:int4", "Unknown method"),
        ("gptq", "lacks a qtype"),
        ("rtn:int9", "Unsupported qtype"),
        ("rtn:int4:g0", "group_size"),
        ("rtn:int4:x7", "Unknown recipe option"),
        ("w8a8:int4", "takes no options"),
        ("gptq:nf4:g64", "supports int formats"),
        ("rtn:nf4:g64:a8", "symmetric int weight recipes"),
        ("rtn:int4:g32:asym:a8", "symmetric int weight recipes"),
    ],
)
def test_bad_recipes(text, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe(text)


def test_recipe_validates():
    with pytest.raises(ValueError):
        Recipe(method="smoothquant", qtype="int4")
