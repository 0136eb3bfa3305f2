"""PTQ algorithms as plugins: the registry round trip, what the driver hands an algorithm, exact
folds through the model's site table, and per-layer errors that a driver bug would break."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxquant import cli
from jaxquant.core import QArray, quantize_operand
from jaxquant.models.saved import load_quantized
from jaxquant.nn import QuantMode, Transformer, TransformerConfig
from jaxquant.nn.transformer import Block, block_sites
from jaxquant.ptq import (
    ALGORITHMS,
    PTQAlgorithm,
    PTQOptions,
    Stat,
    effective_group,
    layer_group_sizes,
    parse_recipe,
    quantize_model,
)
from jaxquant.ptq.algorithm import SiteInputs
from jaxquant.ptq.hessian import stats_init
from jaxquant.ptq.pipeline import _fold
from jaxquant.ptq.recipe import METHODS, Recipe

OPTS = PTQOptions(batch_windows=4, awq_tokens=256)


def _model(**over):
    cfg = TransformerConfig.tiny(**over)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 32), 0, 256))
    params = Transformer(cfg).init(jax.random.key(0), tokens[:1])["params"]
    return cfg, params, tokens


@pytest.fixture(scope="module")
def tiny():
    return _model()


def _text(method):
    alg = ALGORITHMS[method]
    return method if (not alg.quantizes or alg.activations) else f"{method}:int4:g32"


@pytest.mark.parametrize("method", METHODS)
def test_registry_round_trip(method):
    recipe = parse_recipe(_text(method))
    assert recipe.method == method and parse_recipe(recipe.name) == recipe
    algo = recipe.algorithm(OPTS)
    assert isinstance(algo, ALGORITHMS[method]) and algo.recipe is recipe
    if ALGORITHMS[method].activations:
        with pytest.raises(ValueError, match="takes no options"):
            parse_recipe(f"{method}:int4")
    if ALGORITHMS[method].int_only:
        with pytest.raises(ValueError, match="supports int formats"):
            parse_recipe(f"{method}:nf4:g32")


def test_awq_gptq_composes_awq_scales_with_gptq_linears():
    algo = parse_recipe("awq+gptq:int3:g32").algorithm(OPTS)
    awq = parse_recipe("awq:int3:g32").algorithm(OPTS)
    gptq = parse_recipe("gptq:int3:g32").algorithm(OPTS)
    assert algo.fold_needs == awq.fold_needs and algo.needs == gptq.needs
    assert algo.sequential and not parse_recipe("awq+gptq:int3").algorithm(
        dataclasses.replace(OPTS, true_sequential=False)).sequential


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Spy(PTQAlgorithm):
    """A plugin that checks what the driver hands it, then rounds to nearest."""

    calls: list = dataclasses.field(default_factory=list)

    @property
    def needs(self):
        return frozenset({Stat.HESSIAN, Stat.SAMPLE})

    @property
    def sequential(self):
        return self.options.true_sequential

    def quantize_linear(self, kernel, spec, inputs, *, site, linear):
        d = site.d_in
        assert linear in site.linears and kernel.shape[0] == d
        assert spec.group_size == effective_group(d, self.recipe.group_size)
        assert inputs.hessian().shape == (d, d) and inputs.sample().shape[1] == d
        assert inputs.sample().shape[0] == OPTS.awq_tokens
        self.calls.append(linear)
        return quantize_operand(kernel, spec, (0,))


@pytest.mark.parametrize("sequential", [True, False])
def test_a_plugin_is_one_class_plus_one_registry_line(tiny, monkeypatch, sequential):
    cfg, params, tokens = tiny
    monkeypatch.setitem(ALGORITHMS, "spy", _Spy)
    recipe = parse_recipe("spy:int4:g48")  # 48 divides neither 64 nor 128: groups of 32
    opts = dataclasses.replace(OPTS, true_sequential=sequential)
    algo = recipe.algorithm(opts)
    monkeypatch.setattr(Recipe, "algorithm", lambda self, options: algo)
    scfg, sp, info = quantize_model(cfg, params, recipe, tokens, options=opts, progress=False)
    # Every linear of every block, once, in the site table's order.
    assert algo.calls == list(block_sites(cfg).linears) * cfg.n_layers
    assert set(info["group_sizes"].values()) == {32}
    out = Transformer(scfg, mode=QuantMode.SERVE).apply({"params": sp}, tokens)
    assert out.shape == (*tokens.shape, cfg.vocab_size) and bool(jnp.isfinite(out).all())


def _block0_inputs(cfg, params, tokens):
    """The float inputs of block 0's linears ``{module path: [tokens, d_in]}``."""
    h = jnp.asarray(params["embed"]["embedding"])[tokens]
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    seen = {}

    def grab(next_fun, args, kwargs, ctx):
        if ctx.method_name == "__call__":
            seen["/".join(ctx.module.path)] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        Block(cfg).apply({"params": params["block_0"]}, h, pos)
    return {lin: seen[lin].reshape(-1, seen[lin].shape[-1]) for lin in block_sites(cfg).linears}


def test_gptq_layer_error_below_rtn_on_every_linear(tiny):
    # One-shot GPTQ calibrates each linear on block 0's float inputs; on those inputs its output
    # error must beat RTN's for all seven linears (a wrong site / Hessian pairing would not).
    cfg, params, tokens = tiny
    opts = dataclasses.replace(OPTS, true_sequential=False)
    _, g, _ = quantize_model(cfg, params, parse_recipe("gptq:int3:g32"), tokens, options=opts,
                             progress=False)
    _, r, _ = quantize_model(cfg, params, parse_recipe("rtn:int3:g32"), None, progress=False)
    xs = _block0_inputs(cfg, params, tokens)
    def flat(tree):  # module path -> kernel
        leaves = traverse_util.flatten_dict(tree["block_0"],
                                            is_leaf=lambda _, v: isinstance(v, QArray))
        return {"/".join(k[:-1]): v for k, v in leaves.items()}

    fw, fg, fr = flat(params), flat(g), flat(r)
    for lin, x in xs.items():
        ref = x @ fw[lin]
        err_g, err_r = (float(jnp.mean((x @ q.dequantize() - ref) ** 2)) for q in (fg[lin], fr[lin]))
        assert err_g < err_r, lin


@dataclasses.dataclass(frozen=True, kw_only=True)
class _RandomScales(PTQAlgorithm):
    @property
    def fold_needs(self):
        return frozenset({Stat.ABS_MAX})

    def site_scale(self, site, inputs, kernels, block):
        assert inputs.abs_max().shape == (site.d_in,)
        key = jax.random.fold_in(jax.random.key(7), hash(site.name) % 1000)
        return jnp.exp(0.5 * jax.random.normal(key, (site.d_in,)))


@pytest.mark.parametrize("n_kv_heads", [4, 2])  # MHA folds o_in into v_proj; GQA cannot
def test_folds_through_the_site_table_keep_the_float_block(n_kv_heads):
    cfg, params, tokens = _model(n_kv_heads=n_kv_heads)
    sites = block_sites(cfg)
    bp = params["block_0"]
    flat = traverse_util.flatten_dict(jax.tree.map(jnp.asarray, bp), sep="/")
    algo = _RandomScales(recipe=parse_recipe("rtn:int8"), options=OPTS)
    measured = {s.name: SiteInputs(stats=stats_init(s.d_in, hessian=False)) for s in sites}
    folded, scales = _fold(algo, sites, flat, measured)
    assert set(scales) == {s.name for s in sites if s.fold_into is not None}
    assert ("o_in" in scales) == (n_kv_heads == cfg.n_heads)
    changed = {k for k in flat if not np.array_equal(flat[k], folded[k])}
    assert changed == {p for s in sites if s.name in scales for p in (s.fold_into, *s.kernels)}
    h = jax.random.normal(jax.random.key(3), (2, 16, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    unflat = traverse_util.unflatten_dict(folded, sep="/")
    y0 = Block(cfg).apply({"params": bp}, h, pos)[0]
    y1 = Block(cfg).apply({"params": unflat}, h, pos)[0]
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4 * float(jnp.abs(y0).max()))


def test_clip_plugin_never_worse_than_rtn_on_its_sample(tiny):
    cfg, params, tokens = tiny
    algo = parse_recipe("clip:int3:g32").algorithm(OPTS)
    assert algo.needs == {Stat.SAMPLE} and not algo.sequential
    xs = _block0_inputs(cfg, params, tokens)
    site = block_sites(cfg)["mlp_in"]
    x = xs["mlp/up_proj"][:512]
    k = params["block_0"]["mlp"]["up_proj"]["kernel"]
    spec = algo.weight_spec(site.d_in)
    q = algo.quantize_linear(k, spec, SiteInputs(raw_sample=x), site=site, linear="mlp/up_proj")
    rtn = quantize_operand(k, spec, (0,))
    err = lambda q: float(jnp.mean((x @ q.dequantize() - x @ k) ** 2))  # noqa: E731
    assert err(q) <= err(rtn) * (1 + 1e-6)
    assert err(q) < err(rtn)  # int3 on random weights: some group does shrink


def test_group_sizes_used_are_recorded(tmp_path, capsys):
    # SmolLM2: 576-wide inputs use groups of 96 for g128; down_proj's 1536 keep 128.
    groups = layer_group_sizes(TransformerConfig.smollm2_135m(), parse_recipe("gptq:int4:g128"))
    assert groups.pop("mlp/down_proj") == 128 and set(groups.values()) == {96}
    assert layer_group_sizes(TransformerConfig.tiny(), parse_recipe("smoothquant")) is None
    # `jaxquant ptq --group-size 7` on tiny (widths 64 and 128): groups of 4, recorded as such
    # in the JSON and the checkpoint's sidecar, and the saved kernels really use them.
    out, ck = tmp_path / "p.json", tmp_path / "ck"
    assert cli.main(["ptq", "--model", "tiny", "--method", "rtn", "--qtype", "int4",
                     "--group-size", "7", "--json", str(out), "--out", str(ck)]) == 0
    assert "does not divide" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["recipe"] == "rtn:int4:g7"
    assert r["group_sizes"] == {lin: 4 for lin in block_sites(TransformerConfig.tiny()).linears}
    _, sp, sidecar = load_quantized(ck)
    assert sidecar["info"]["group_sizes"] == r["group_sizes"]
    assert sp["block_0"]["mlp"]["down_proj"]["kernel"].group_size == 4
