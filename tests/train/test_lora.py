"""LoRA / QLoRA on the tiny Transformer: exact start at the base, adapter-only training,
merge == adapter forward, adapters saved bit for bit, dropout only on the adapter path."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.checkpoint import save
from jaxquant.core import QArray
from jaxquant.core.double_quant import DoubleQuantArray
from jaxquant.errors import JaxquantError
from jaxquant.nn import Transformer, TransformerConfig
from jaxquant.train import make_optimizer
from jaxquant.train.lora import (
    ALL_WEIGHTS,
    PROJECTIONS,
    LoRAConfig,
    base_memory,
    dequantize_base,
    init_adapters,
    init_lora,
    init_lora_state,
    load_adapters,
    lora_apply,
    make_lora_eval_step,
    make_lora_train_step,
    memory_report,
    merge_adapters,
    quantize_base,
    save_adapters,
)

TINY = TransformerConfig.tiny(n_layers=1)  # one block: the compiles are the slow part
TOKENS = jnp.tile(jnp.arange(16, dtype=jnp.int32) * 7 % 256, (2, 2))  # learnable pattern [2, 32]
SEVEN = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj",
         "mlp/up_proj", "mlp/down_proj")

_apply = jax.jit(lora_apply, static_argnums=(0, 4))
_float_apply = jax.jit(lambda p, t: Transformer(TINY).apply({"params": p}, t))


@pytest.fixture(scope="module")
def params():
    return jax.jit(Transformer(TINY).init)(jax.random.key(0), TOKENS)["params"]


@pytest.fixture(scope="module")
def built(params):
    """``{base format: (lora, base, adapters)}`` for float LoRA, QLoRA and QLoRA with the
    embedding frozen in NF4 too (one config each, so the tests share their compiles)."""
    out = {}
    for fmt in (None, "nf4", "nf4_all"):
        lora = LoRAConfig(rank=4, alpha=8.0, base=fmt and "nf4",
                          base_targets=ALL_WEIGHTS if fmt == "nf4_all" else PROJECTIONS)
        out[fmt] = (lora, *init_lora(params, lora, jax.random.key(1)))
    return out


def _leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, (QArray, DoubleQuantArray)))


def _with_random_b(adapters, seed=1, scale=0.05):
    """Adapters whose B is random (a trained-looking adapter without training)."""
    flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
    out = adapters
    for i, (path, leaf) in enumerate(flat):
        if path[-1].key == "lora_b":
            new = scale * jax.random.normal(jax.random.key(seed + i), leaf.shape)
            out = jax.tree_util.tree_map_with_path(
                lambda p, x, path=path, new=new: new if p == path else x, out)
    return out


@pytest.mark.parametrize("base_fmt", [None, "nf4", "nf4_all"])
def test_zero_b_is_exactly_the_base_model(built, base_fmt):
    """B = 0: float LoRA == the float model, QLoRA == the model on the dequantized NF4 kernels
    (and embedding: lookup and tied head), bit for bit (the adapter term adds an exact zero)."""
    lora, base, adapters = built[base_fmt]
    q = [x for x in _leaves(base) if isinstance(x, DoubleQuantArray)]
    assert len(q) == {None: 0, "nf4": 7 * TINY.n_layers, "nf4_all": 7 * TINY.n_layers + 1}[base_fmt]
    if base_fmt == "nf4_all":
        emb = base["embed"]["embedding"]
        assert isinstance(emb, DoubleQuantArray) and emb.group_axis == 1
        mem = base_memory(base)  # the whole frozen base, norm scales included
        assert mem["bytes_per_param"] <= 0.56 and mem["quantized_bytes_per_param"] <= 0.52
    ref = _float_apply(dequantize_base(base), TOKENS)
    out = _apply(TINY, base, adapters, TOKENS, lora)
    if base_fmt == "nf4_all":
        # the tied head's product runs on a table computed in the step rather than a param:
        # XLA may emit that dot with another accumulation order (ulp-level, measured 2e-7);
        # the lookup and each part alone are bit-exact
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-6 * scale)
    else:
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    # ... and the adapters are not a no-op: a nonzero B moves the logits
    moved = _apply(TINY, base, _with_random_b(adapters), TOKENS, lora)
    assert float(jnp.abs(moved - ref).max()) > 1e-3


def test_adapters_on_every_projection_by_default_and_by_regex(params):
    ad = init_adapters(params, LoRAConfig(rank=4), jax.random.key(0))
    flat = {"/".join(k.key for k in p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(ad)[0]}
    assert flat == {f"block_0/{s}" for s in SEVEN}
    a = ad["block_0"]["mlp"]["down_proj"]["lora_a"]
    b = ad["block_0"]["mlp"]["down_proj"]["lora_b"]
    assert a.shape == (TINY.ffn_dim, 4) and b.shape == (4, TINY.d_model)
    assert np.all(np.asarray(b) == 0)
    bound = 1 / np.sqrt(TINY.ffn_dim)  # PEFT's kaiming_uniform(a=sqrt(5))
    assert np.all(np.abs(np.asarray(a)) <= bound) and np.asarray(a).std() > bound / 3
    qv = init_adapters(params, LoRAConfig(rank=2, targets=r"attn/(q|v)_proj$"), jax.random.key(0))
    assert set(qv["block_0"]["attn"]) == {"q_proj", "v_proj"} and "mlp" not in qv["block_0"]
    with pytest.raises(ValueError, match="matched no kernel"):
        init_adapters(params, LoRAConfig(targets="nothing_here"), jax.random.key(0))
    stray = {"block_9": ad["block_0"]}  # adapters of another (deeper) model
    with pytest.raises(ValueError, match="match no dense layer"):
        jax.eval_shape(lambda a: lora_apply(TINY, params, a, TOKENS, LoRAConfig(rank=4)), stray)


def test_dropout_is_on_the_adapter_input_only(built):
    lora0, base, adapters = built["nf4"]
    lora = dataclasses.replace(lora0, dropout=0.5)
    k1, k2 = jax.random.key(7), jax.random.key(8)
    ref = _apply(TINY, base, adapters, TOKENS, lora0)  # no dropout
    # B = 0: dropout on the adapter's input leaves the base path untouched
    np.testing.assert_array_equal(
        np.asarray(_apply(TINY, base, adapters, TOKENS, lora, dropout_key=k1)), np.asarray(ref))
    trained = _with_random_b(adapters)
    det = _apply(TINY, base, trained, TOKENS, lora0)
    d1 = _apply(TINY, base, trained, TOKENS, lora, dropout_key=k1)
    d1b = _apply(TINY, base, trained, TOKENS, lora, dropout_key=k1)
    d2 = _apply(TINY, base, trained, TOKENS, lora, dropout_key=k2)
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d1b))  # the key decides the mask
    assert float(jnp.abs(d1 - d2).max()) > 1e-4 and float(jnp.abs(d1 - det).max()) > 1e-4


@pytest.fixture(scope="module")
def trained(params):
    """Six QLoRA steps (dropout 0.1) on a fixed batch."""
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.1)
    base, adapters = init_lora(params, lora, jax.random.key(1))
    before = [np.array(x) for x in jax.tree.leaves(base)]
    opt = make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=20, weight_decay=0.0)
    step = make_lora_train_step(TINY, base, opt, lora, seed=3)
    state0 = init_lora_state(adapters, opt)
    state, losses = state0, []
    for _ in range(6):
        state, m = step(state, TOKENS)
        losses.append(float(m["loss"]))
    return dict(lora=lora, base=base, before=before, step=step, state0=state0, state=state,
                losses=losses, opt=opt)


def test_steps_lower_the_loss_and_train_only_the_adapters(trained):
    losses, state, base = trained["losses"], trained["state"], trained["base"]
    assert losses[-1] < losses[0] - 0.05, losses
    # the frozen base is bit-identical after the steps
    after = jax.tree.leaves(base)
    assert len(after) == len(trained["before"])
    for a, b in zip(trained["before"], after, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    # the optimizer state holds adapter-sized arrays only: its moments mirror the adapter tree
    ad_struct = jax.tree.structure(state.adapters)
    ad_shapes = sorted(x.shape for x in jax.tree.leaves(state.adapters))
    moments = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda t: hasattr(t, "mu"))
               if hasattr(s, "mu")]
    assert moments
    for s in moments:
        for m in (s.mu, s.nu):
            assert jax.tree.structure(m) == ad_struct
    big = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert big == sorted(ad_shapes * 2)  # mu and nu, nothing else with an axis
    # the adapters moved (B left zero)
    b = state.adapters["block_0"]["attn"]["q_proj"]["lora_b"]
    assert float(jnp.abs(b).max()) > 0


def test_a_step_is_deterministic_given_the_state(trained):
    """Dropout masks come from (seed, step): the same state gives the same step, bit for bit
    (what resuming needs)."""
    step, s0 = trained["step"], trained["state0"]
    a, ma = step(s0, TOKENS)
    b, mb = step(s0, TOKENS)
    assert float(ma["loss"]) == float(mb["loss"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("base_fmt", [None, "nf4", "nf4_all"])
def test_merged_params_reproduce_the_adapter_forward(params, built, base_fmt):
    lora, base, adapters = built[base_fmt]
    adapters = _with_random_b(adapters)
    merged = merge_adapters(base, adapters, lora)
    assert all(not isinstance(x, (QArray, DoubleQuantArray)) for x in _leaves(merged))
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    want = _apply(TINY, base, adapters, TOKENS, lora)
    got = _float_apply(merged, TOKENS)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * scale)
    # the un-adapted leaves are the base's (dequantized), unchanged
    np.testing.assert_array_equal(np.asarray(merged["embed"]["embedding"]),
                                  np.asarray(dequantize_base(base)["embed"]["embedding"]))
    np.testing.assert_array_equal(np.asarray(merged["final_norm"]["scale"]),
                                  np.asarray(params["final_norm"]["scale"]))


def test_adapters_save_and_load_bit_identical(trained, tmp_path):
    ad, lora = trained["state"].adapters, trained["lora"]
    path = save_adapters(tmp_path / "adapters", ad, lora)
    back, lora2 = load_adapters(path)
    assert lora2 == lora
    assert jax.tree.structure(back) == jax.tree.structure(ad)
    for x, y in zip(jax.tree.leaves(ad), jax.tree.leaves(back), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the adapters alone: a small fraction of the model on disk
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    model_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(dequantize_base(trained["base"])))
    adapter_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(ad))
    assert adapter_bytes < 0.25 * model_bytes and on_disk < model_bytes
    save(tmp_path / "other", {"w": jnp.ones(3)})
    with pytest.raises(JaxquantError, match="not a LoRA adapter checkpoint"):
        load_adapters(tmp_path / "other")


def test_memory_report(trained):
    rep = memory_report(trained["step"], trained["state"], TOKENS)
    base = rep["base"]
    dq = [x for x in _leaves(trained["base"]) if isinstance(x, DoubleQuantArray)]
    assert base["quantized_params"] == sum(int(np.prod(x.shape)) for x in dq)
    assert base["quantized_bytes"] == sum(x.nbytes for x in dq)
    assert base["quantized_bytes_per_param"] <= 0.56
    assert base == base_memory(trained["base"])
    n_ad = sum(x.size for x in jax.tree.leaves(trained["state"].adapters))
    assert rep["adapter_params"] == n_ad and rep["adapter_bytes"] == 4 * n_ad
    assert rep["opt_state_bytes"] <= 2 * 4 * n_ad + 64  # mu, nu + counters
    mem = rep["step_memory"]
    if mem:  # the CPU backend reports it; be lenient with others
        assert mem["peak_bytes"] > 0 and mem["argument_size_in_bytes"] > 0


def test_eval_step_matches_apply(trained):
    ev = make_lora_eval_step(TINY, trained["base"], trained["lora"])
    loss, n = ev(trained["state"].adapters, TOKENS)
    assert int(n) == TOKENS.shape[0] * (TOKENS.shape[1] - 1) and np.isfinite(float(loss))


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(rank=0), "rank"),
        (dict(rank=2.0), "rank"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(targets="("), "not a valid regex"),
        (dict(targets=""), "targets"),
        (dict(base="nf5"), "base"),
        (dict(block_size=0), "block_size"),
        (dict(double_quant=1), "double_quant"),
    ],
)
def test_config_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        LoRAConfig(**kwargs)


def test_config_defaults_and_base_errors(params, built):
    c = LoRAConfig()
    assert (c.rank, c.alpha, c.dropout, c.base, c.block_size, c.double_quant) == (
        16, 16.0, 0.0, "nf4", 64, True)
    assert c.scaling == 1.0 and re.search(c.targets, "block_3/mlp/down_proj")
    assert not re.search(PROJECTIONS, "lm_head") and not re.search(PROJECTIONS, "embed")
    with pytest.raises(ValueError, match="does not divide"):
        init_lora(params, LoRAConfig(block_size=48), jax.random.key(0))
    with pytest.raises(ValueError, match="already quantized"):
        init_lora(built["nf4"][1], LoRAConfig(rank=2), jax.random.key(0))
    # without double quantization: plain block-wise NF4 QArrays, 0.5625 bytes/param (> 0.56)
    plain = quantize_base(params, LoRAConfig(double_quant=False))
    q = [x for x in _leaves(plain) if isinstance(x, (QArray, DoubleQuantArray))]
    assert len(q) == 7 and all(isinstance(x, QArray) and x.group_size == 64 for x in q)
    assert base_memory(plain)["quantized_bytes_per_param"] == pytest.approx(0.5625)
    assert base_memory(built["nf4"][1])["quantized_bytes_per_param"] < 0.52


def test_frozen_kernels_are_dequantized_one_layer_at_a_time():
    """The compiled gradient of a chain of frozen NF4 products keeps O(1) float kernels alive,
    not one or two per layer (XLA would otherwise hoist every dequantization to the start and
    share it between the forward and the backward pass)."""
    from jaxquant.core.double_quant import double_quantize
    from jaxquant.train.lora import _frozen_product

    d = 256
    kernel_bytes = d * d * 4

    def temp(n_layers):
        ks = [jax.eval_shape(lambda: double_quantize(jnp.zeros((d, d))))] * n_layers

        def loss(a, ks, x):
            h = x
            for k in ks:
                h = jnp.tanh(_frozen_product(h, k, None, np.dtype("float32")) + (h @ a) @ a.T)
            return jnp.sum(h)

        args = (jax.ShapeDtypeStruct((d, 4), jnp.float32), ks,
                jax.ShapeDtypeStruct((8, d), jnp.float32))
        ma = jax.jit(jax.grad(loss)).lower(*args).compile().memory_analysis()
        return getattr(ma, "temp_size_in_bytes", None)

    t2, t8 = temp(2), temp(8)
    if t2 is None:
        pytest.skip("this backend reports no memory analysis")
    assert t8 - t2 < kernel_bytes, (t2, t8, kernel_bytes)  # plain dequantize: ~12 kernels more
