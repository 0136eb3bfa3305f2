"""Block-by-block PTQ on an architecture that is not the LLaMA: a parallel-attention block
(GPT-J / PaLM: ``x + attn(norm(x)) + mlp(norm(x))``, a GELU MLP, blocks named ``layers_i``),
described by a :class:`~jaxquant.nn.block_stack.BlockStack` written here, in the test, as a user
would write it for their model."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.core import QArray
from jaxquant.nn import BlockStack, QuantMode, RMSNorm, Site, SiteTable
from jaxquant.nn.attention import Attention, qdense
from jaxquant.nn.config import TransformerConfig
from jaxquant.nn.modes import convert
from jaxquant.ptq import PTQOptions, parse_recipe, quantize_blocks
from jaxquant.ptq.pipeline import serving_config


class GeluMLP(nn.Module):
    cfg: TransformerConfig
    mode: QuantMode

    @nn.compact
    def __call__(self, x):
        h = qdense(self, "fc_in", self.cfg.ffn_dim, self.cfg, self.mode)(x)
        return qdense(self, "fc_out", self.cfg.d_model, self.cfg, self.mode)(nn.gelu(h))


class ParallelBlock(nn.Module):
    cfg: TransformerConfig
    mode: QuantMode = QuantMode.TRAIN

    @nn.compact
    def __call__(self, x, positions):
        y = RMSNorm(name="norm")(x)
        h, _ = Attention(self.cfg, self.mode, name="attn")(y, positions)
        return x + h + GeluMLP(self.cfg, self.mode, name="mlp")(y)


class ParallelLM(nn.Module):
    cfg: TransformerConfig
    mode: QuantMode = QuantMode.TRAIN

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.cfg.vocab_size, self.cfg.d_model, name="embed")
        x = embed(tokens)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        for i in range(self.cfg.n_layers):
            x = ParallelBlock(self.cfg, self.mode, name=f"layers_{i}")(x, positions)
        return embed.attend(RMSNorm(name="final_norm")(x))


@dataclasses.dataclass(frozen=True)
class ParallelStack(BlockStack):
    cfg: TransformerConfig

    @property
    def block_keys(self):
        return tuple(f"layers_{i}" for i in range(self.cfg.n_layers))

    @property
    def sites(self):
        c = self.cfg
        return SiteTable(sites=(
            Site(name="in", linears=("attn/q_proj", "attn/k_proj", "attn/v_proj", "mlp/fc_in"),
                 d_in=c.d_model, fold_into="norm/scale", bilinear=("attn/q_proj", "attn/k_proj")),
            Site(name="o_in", linears=("attn/o_proj",), d_in=c.q_dim),
            Site(name="fc_out_in", linears=("mlp/fc_out",), d_in=c.ffn_dim),
        ))

    @property
    def block_prefix(self):
        return r"(^|/)layers_\d+/"

    def block_inputs(self, params, tokens):
        h = params["embed"]["embedding"][tokens]
        return h, (jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),)

    def block(self, rules, mode):
        cfg = self.cfg if rules is None else dataclasses.replace(self.cfg, quant_rules=tuple(rules))
        return ParallelBlock(cfg, mode)

    def serving(self, rules):
        return self.cfg if rules is None else dataclasses.replace(self.cfg, quant_rules=tuple(rules))


CFG = TransformerConfig.tiny()


@pytest.fixture(scope="module")
def setup():
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = ParallelLM(CFG).init(jax.random.key(0), tokens)["params"]
    params = jax.tree.map(lambda p: p * 8.0 if p.ndim == 2 else p, params)  # a peakier function
    rng = np.random.default_rng(0)
    calib = rng.integers(0, CFG.vocab_size, (8, 32))
    test = jnp.asarray(rng.integers(0, CFG.vocab_size, (4, 32)))
    ref = ParallelLM(CFG).apply({"params": params}, test)
    return params, calib, test, ref


def _error(setup, recipe: str, **opts) -> tuple[float, dict, object]:
    params, calib, test, ref = setup
    scfg, sp, info = quantize_blocks(ParallelStack(CFG), params, parse_recipe(recipe), calib,
                                     options=PTQOptions(batch_windows=4, **opts), progress=False)
    out = ParallelLM(scfg, QuantMode.SERVE).apply({"params": sp}, test)
    return float(jnp.mean((out - ref) ** 2) / jnp.var(ref)), sp, info


def test_rtn_through_the_stack_is_the_models_own_convert(setup):
    """Every block linear (four at the shared site) is quantized with the per-layer group,
    and RTN gives exactly what ``convert`` of the same rules gives."""
    params = setup[0]
    recipe = parse_recipe("rtn:int4:g32")
    _, sp, info = _error(setup, "rtn:int4:g32")
    assert info["group_sizes"] == {lin: 32 for lin in ParallelStack(CFG).sites.linears}
    want = convert(ParallelLM(serving_config(ParallelStack(CFG), recipe)), params, setup[2])
    for i in range(CFG.n_layers):
        for mod, lin in [("attn", "q_proj"), ("attn", "o_proj"), ("mlp", "fc_in"),
                         ("mlp", "fc_out")]:
            got, ref = sp[f"layers_{i}"][mod][lin]["kernel"], want[f"layers_{i}"][mod][lin]["kernel"]
            assert isinstance(got, QArray) and got.group_size == 32
            np.testing.assert_array_equal(np.asarray(got.qvalue), np.asarray(ref.qvalue))
            np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(ref.scale))
    assert not isinstance(sp["embed"]["embedding"], QArray)  # outside the blocks: untouched


def test_calibrated_methods_beat_rtn_on_another_architecture(setup):
    e_rtn, _, _ = _error(setup, "rtn:int4:g32")
    e_gptq, _, _ = _error(setup, "gptq:int4:g32")
    e_awq, sp, _ = _error(setup, "awq:int4:g32")
    assert e_gptq < e_rtn
    assert e_awq < e_rtn
    # AWQ folded its scale of the shared site into the block's own norm (no LLaMA names).
    assert not np.allclose(np.asarray(sp["layers_0"]["norm"]["scale"]),
                           np.asarray(setup[0]["layers_0"]["norm"]["scale"]))


def test_a_site_table_naming_a_missing_linear_is_an_error(setup):
    params, calib, _, _ = setup

    @dataclasses.dataclass(frozen=True)
    class Wrong(ParallelStack):
        @property
        def sites(self):
            return SiteTable(sites=(Site(name="x", linears=("attn/nope",), d_in=CFG.d_model),))

    with pytest.raises(ValueError, match="site table"):
        quantize_blocks(Wrong(CFG), params, parse_recipe("gptq:int4:g32"), calib,
                        progress=False)
