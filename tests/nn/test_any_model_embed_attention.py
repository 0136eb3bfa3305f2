"""``jq.quantize_model`` on embeddings and on the products inside multi-head attention.

Embed (linen and NNX): the table is quantized per row (groups over features); the lookup is
within half a step of the float rows, ``attend`` within the bound of both operands' steps;
train -> convert -> serve gives the same outputs; the served lookup gathers codes and never
dequantizes the whole table. Attention: ``q . k`` and ``attn . v`` get int8 x int8 -> int32
products under a w8a8 rule, within the int8 step bound of the float products.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.core import QArray
from jaxquant.core.dot_config import DotGeneralConfig
from jaxquant.nn.any_model import layer_plans, report, to_serving
from jaxquant.nn.layer_quant import LayerPlan, Op
from jaxquant.nn.nnx_model import QKernel, QuantEmbed
from jaxquant.nn.quant_attention import AttentionEinsum, NnxAttentionFn, attention_plan
from tests.nn.helpers import step_per_element

EPS32 = float(np.finfo(np.float32).eps)
CONFIGS = {
    "int4_g16": jq.weight_only("int4", group_size=16),
    "w8a8": jq.w8a8(),
}
V, D = 40, 32


def japply(module, method=None):
    """``module.apply`` jitted: one compile, much faster on CPU than many eager ops."""
    return jax.jit(functools.partial(module.apply, method=method))


def jinit(module):
    return jax.jit(module.init)


ncall = nnx.jit(lambda m, x: m(x))


def _max(a):
    return float(jnp.max(jnp.abs(a)))




class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(V, D)
        return embed.attend(nn.tanh(embed(tokens)))


class NnxTiedLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)

    def __call__(self, tokens):
        return self.embed.attend(nnx.tanh(self.embed(tokens)))


TOKENS = (jnp.arange(14).reshape(2, 7) * 3) % V


def _check_embed(table, q, rows_q, rows_f, query, att_q, att_f, cfg):
    """The lookup within half a step per element; attend within the steps of both operands."""
    assert isinstance(q, QArray) and q.shape == (V, D)
    half = step_per_element(q) / 2
    np.testing.assert_array_less(jnp.abs(q.dequantize() - table), half + 1e-7)
    idx = TOKENS
    assert bool(jnp.all(jnp.abs(rows_q - rows_f) <= half[idx] + 1e-7))
    assert _max(rows_q - rows_f) > 0
    # attend: query . table^T, linear in both: bound from each operand's half step
    bound = jnp.abs(query) @ half.T
    if cfg.lhs is not None:
        qhalf = jnp.max(jnp.abs(query), axis=-1, keepdims=True) / 127 / 2
        bound = bound + jnp.broadcast_to(qhalf, query.shape) @ jnp.abs(q.dequantize()).T
    slack = 8 * EPS32 * (jnp.abs(query) @ jnp.abs(table).T) + 1e-6
    err = jnp.abs(att_q - att_f)
    assert bool(jnp.all(err <= bound + slack)), float(jnp.max(err - bound - slack))


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_linen_embed_train_convert_serve(cfg_name):
    cfg = CONFIGS[cfg_name]
    model = TiedLM()
    qmodel = jq.quantize_model(model, [jq.QuantRule(".*", cfg)], TOKENS)
    assert layer_plans(qmodel)["Embed_0"].op is Op.EMBED
    variables = jinit(model)(jax.random.key(0), TOKENS)
    table = variables["params"]["Embed_0"]["embedding"]
    y_train = japply(qmodel)(variables, TOKENS)
    serving = to_serving(qmodel, variables)
    q = serving["params"]["Embed_0"]["embedding"]
    # train -> convert -> serve: the same logits, jitted or not
    tol = 16 * EPS32 * max(1.0, _max(y_train))
    np.testing.assert_allclose(japply(qmodel)(serving, TOKENS), y_train, rtol=0, atol=tol)
    np.testing.assert_allclose(qmodel.apply(serving, TOKENS), y_train, rtol=0, atol=tol)
    # the error bounds, per method, on the table alone
    emb, served = {"params": {"embedding": table}}, {"params": {"embedding": q}}
    qemb = jq.quantize_model(nn.Embed(V, D), [jq.QuantRule(".*", cfg)], TOKENS)
    rows_f, rows_q = japply(nn.Embed(V, D))(emb, TOKENS), japply(qemb)(served, TOKENS)
    np.testing.assert_array_equal(japply(qemb)(emb, TOKENS), rows_q)  # train == serve, exactly
    query = jax.random.normal(jax.random.key(3), (5, D))
    att_f = japply(nn.Embed(V, D), "attend")(emb, query)
    att_q = japply(qemb, "attend")(emb, query)
    np.testing.assert_allclose(japply(qemb, "attend")(served, query), att_q, atol=1e-5)
    _check_embed(table, q, rows_q, rows_f, query, att_q, att_f, cfg)
    # QAT: the table gets gradients through both the lookup and attend
    g = jax.jit(jax.grad(lambda p: jnp.sum(qmodel.apply({"params": p}, TOKENS) ** 2)))(
        variables["params"]
    )
    assert _max(g["Embed_0"]["embedding"]) > 0


def test_served_lookup_gathers_codes_not_the_table():
    model = nn.Embed(V, D)
    qmodel = jq.quantize_model(model, [jq.QuantRule(".*", CONFIGS["int4_g16"])], TOKENS)
    serving = to_serving(qmodel, jinit(model)(jax.random.key(0), TOKENS))
    q = serving["params"]["embedding"]
    assert q.qvalue.dtype == jnp.uint8 and q.qvalue.size == V * D // 2  # two codes a byte
    assert q.nbytes == V * D // 2 + 4 * V * (D // 16)  # codes + one f32 scale per group
    jaxpr = str(jax.make_jaxpr(qmodel.apply)(serving, TOKENS))
    assert f"f32[{V},{D}]" not in jaxpr  # the whole table is never dequantized
    assert any("gather" in ln and "u8[" in ln for ln in jaxpr.splitlines())


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_nnx_embed_train_convert_serve(cfg_name):
    cfg = CONFIGS[cfg_name]
    model = NnxTiedLM(nnx.Rngs(0))
    qmodel = jq.quantize_model(model, [jq.QuantRule(".*", cfg)], TOKENS)
    assert type(model.embed) is nnx.Embed and isinstance(qmodel.embed, QuantEmbed)
    table = model.embed.embedding[...]
    y_train = ncall(qmodel, TOKENS)
    assert _max(y_train - ncall(model, TOKENS)) > 0
    serving = to_serving(qmodel)
    q = serving.embed.embedding[...]
    assert isinstance(serving.embed.embedding, QKernel) and isinstance(q, QArray)
    tol = 16 * EPS32 * max(1.0, _max(y_train))
    np.testing.assert_allclose(ncall(serving, TOKENS), y_train, rtol=0, atol=tol)
    np.testing.assert_allclose(serving(TOKENS), y_train, rtol=0, atol=tol)  # eager too
    query = jax.random.normal(jax.random.key(3), (5, D))
    lookup = nnx.jit(lambda m, t: m.embed(t))
    attend = nnx.jit(lambda m, v: m.embed.attend(v))
    _check_embed(
        table,
        q,
        lookup(qmodel, TOKENS),
        lookup(model, TOKENS),
        query,
        attend(qmodel, query),
        attend(model, query),
        cfg,
    )
    np.testing.assert_array_equal(lookup(serving, TOKENS), lookup(qmodel, TOKENS))
    g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(TOKENS) ** 2)))(qmodel)
    assert _max(g["embed"]["embedding"][...]) > 0


# --- attention products ------------------------------------------------------------------------


def _half_rows(x, axis):
    """Half the int8 step of ``x`` quantized with one scale per slice along ``axis``."""
    return jnp.broadcast_to(jnp.max(jnp.abs(x), axis=axis, keepdims=True) / 127 / 2, x.shape)


@pytest.mark.parametrize(
    ("eq", "lhs_shape", "rhs_shape", "lc", "rc"),
    [
        ("...qhd,...khd->...hqk", (2, 5, 3, 8), (2, 6, 3, 8), -1, -1),  # q . k over d
        ("...hqk,...khd->...qhd", (2, 3, 5, 6), (2, 6, 3, 8), -1, 1),  # attn . v over k
    ],
)
def test_attention_products_within_the_int8_steps(eq, lhs_shape, rhs_shape, lc, rc):
    plan = attention_plan("attn", "MultiHeadDotProductAttention", jq.w8a8())
    a = jax.random.normal(jax.random.key(1), lhs_shape)
    b = jax.random.normal(jax.random.key(2), rhs_shape)
    if eq.startswith("...hqk"):
        a = jax.nn.softmax(a)  # attention weights
    y = jax.jit(lambda u, v: AttentionEinsum(plan)(eq, u, v))(a, b)
    y_f = jnp.einsum(eq, a, b)
    ha, hb = _half_rows(a, lc), _half_rows(b, rc)
    bound = jnp.einsum(eq, jnp.abs(a), hb) + jnp.einsum(eq, ha, jnp.abs(b) + hb)
    slack = 8 * EPS32 * jnp.einsum(eq, jnp.abs(a), jnp.abs(b)) + 1e-7
    err = jnp.abs(y - y_f)
    assert bool(jnp.all(err <= bound + slack)) and _max(err) > 0
    jaxpr = str(jax.make_jaxpr(lambda u, v: AttentionEinsum(plan)(eq, u, v))(a, b))
    dots = [ln for ln in jaxpr.splitlines() if "dot_general" in ln]
    assert dots and all("i32[" in ln for ln in dots), dots  # int8 x int8 -> int32
    # a weight-only rule leaves the products float (they hold no weights)
    assert attention_plan("attn", "MHA", jq.weight_only("int4", group_size=32)) is None


class ViT(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)(x)
        return nn.Dense(10)(h.mean(1))


def _int_dots(jaxpr: str) -> list[str]:
    return [ln.split("=")[0].strip() for ln in jaxpr.splitlines() if "dot_general" in ln]


@pytest.mark.slow  # 20-45 s on 2 cores; CI runs it in its slow pass
def test_linen_attention_products_are_int8_and_train_equals_serve():
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    model = ViT()
    variables = jinit(model)(jax.random.key(0), x)
    # only the attention products: a rule on the attention's own path, everything else float
    rules = [jq.QuantRule(r"Attention_0$", jq.w8a8()), jq.QuantRule(".*", None)]
    qmodel = jq.quantize_model(model, rules, x)
    assert set(layer_plans(qmodel)) == {"MultiHeadDotProductAttention_0"}
    assert "(attention) w=int8 a=int8" in report(qmodel)
    y_f, y_q = japply(model)(variables, x), japply(qmodel)(variables, x)
    assert 0 < _max(y_q - y_f) < 0.05 * _max(y_f)
    dots = _int_dots(str(jax.make_jaxpr(qmodel.apply)(variables, x)))
    assert [d.split(":")[1] for d in dots if "i32" in d] == ["i32[2,4,6,6]", "i32[2,4,6,8]"]
    # with w8a8 everywhere: train -> convert -> serve equal
    qall = jq.quantize_model(model, [jq.QuantRule(".*", jq.w8a8())], x)
    y_train = japply(qall)(variables, x)
    serving = to_serving(qall, variables)
    np.testing.assert_allclose(japply(qall)(serving, x), y_train, rtol=0, atol=1e-5)


def test_attention_that_cannot_be_quantized_is_named():
    x = jnp.ones((2, 6, 32))

    def my_attention(query, key, value, **kwargs):
        return nn.dot_product_attention(query, key, value)

    class Custom(nn.Module):
        @nn.compact
        def __call__(self, v):
            return nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=my_attention)(v)

    with pytest.raises(ValueError, match=r"MultiHeadDotProductAttention_0: .*attention_fn"):
        jq.quantize_model(Custom(), [jq.QuantRule(".*", jq.w8a8())], x)
    ok = [jq.QuantRule(r"Attention_0$", None), jq.QuantRule(".*", jq.w8a8())]
    assert "MultiHeadDotProductAttention_0" not in layer_plans(jq.quantize_model(Custom(), ok, x))
    with pytest.raises(ValueError, match=r"attn: .*groups of 32"):
        grouped = DotGeneralConfig(lhs=jq.QuantSpec(qtype="int8", group_size=32))
        attention_plan("attn", "MHA", grouped)


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=32, decode=False, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.out((x + self.attn(x, mask=nnx.make_causal_mask(x[..., 0]))).mean(1))


@pytest.mark.slow  # 20-45 s on 2 cores; CI runs it in its slow pass
def test_nnx_attention_fn_is_nnx_attention_and_its_products_quantize():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 6, 4, 8)) for i in range(3))
    float_plan = LayerPlan(
        path="attn",
        layer="MHA",
        op=Op.ATTENTION,
        kernel_shape=(),
        contracting_axes=(),
        config=DotGeneralConfig(),
    )
    mask = nnx.make_causal_mask(jnp.ones((2, 6)))
    kv2 = k[..., :2, :], v[..., :2, :]  # grouped-query attention: 4 query heads on 2 kv heads
    for args, kw in [
        ((q, k, v), {"mask": mask}),
        ((q, k, v), {"is_causal": True}),
        ((q, *kv2), {}),
    ]:
        want = jax.jit(functools.partial(nnx.dot_product_attention, **kw))(*args)
        got = jax.jit(functools.partial(NnxAttentionFn(float_plan), **kw))(*args)
        np.testing.assert_allclose(got, want, atol=1e-5)
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    model = NnxBlock(nnx.Rngs(0))
    rules = [jq.QuantRule("^attn$", jq.w8a8()), jq.QuantRule(".*", None)]
    qmodel = jq.quantize_model(model, rules, x)
    assert set(layer_plans(qmodel)) == {"attn"}
    y_f, y_q = ncall(model, x), ncall(qmodel, x)
    assert 0 < _max(y_q - y_f) < 0.05 * _max(y_f)
    dots = _int_dots(str(jax.make_jaxpr(lambda v: qmodel(v))(x)))
    assert [d.split(":")[1] for d in dots if "i32" in d] == ["i32[2,4,6,1,6]", "i32[2,4,1,6,8]"]
    qall = jq.quantize_model(model, [jq.QuantRule(".*", jq.w8a8())], x)
    np.testing.assert_allclose(ncall(to_serving(qall), x), ncall(qall, x), rtol=0, atol=1e-5)
