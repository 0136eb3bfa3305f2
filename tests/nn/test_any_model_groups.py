"""Groups on kernels that contract over several axes (issue 14).

The output projection of ``nn.MultiHeadDotProductAttention`` / ``nnx.MultiHeadAttention`` is a
``[heads, head_dim, d_model]`` kernel contracting over ``(0, 1)``. A group of ``g`` is ``g``
consecutive elements of the flattened ``d_in = heads * head_dim`` (row-major), i.e. of the
innermost contracting axis ``head_dim`` (``g`` adapted to divide it), with a scale ``[heads,
head_dim / g, d_model]``. Checked: the plan and report, the scale is exactly each group's absmax
step (so the groups are the ones claimed) and the dequantized kernel is within half a step of the
float kernel per group; QAT forward == served forward; served bytes; the ``dot_general`` with
such an rhs (weight-only and w8a8) against its dequantize-then-dot definition; GPTQ through the
flattened matrix view maps back to the same layout and beats round to nearest.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.core import QArray
from jaxquant.core.dot_general import dot_general_reference, quantize_operand
from jaxquant.nn.any_model import layer_plans, report, to_serving
from jaxquant.nn.layer_quant import Op, make_plan
from jaxquant.nn.nnx_model import QKernel
from jaxquant.ptq.any_model import calibrate_and_convert, quantize_layer
from jaxquant.ptq.kernel_view import dot_rows, einsum_rows, matrix_view, to_matrix
from tests.nn.helpers import step_per_element

EPS32 = float(np.finfo(np.float32).eps)
G32 = jq.weight_only("int4", group_size=32)
RULES = [jq.QuantRule(r".*", G32)]
D = 32


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def inputs(seed, n, s=5):
    """``[n, s, D]`` correlated, anisotropic inputs (GPTQ has directions to exploit)."""
    mix = _normal(123, (D, D)) * np.exp(-np.arange(D, dtype=np.float32) / 5.0)[:, None]
    return jnp.asarray(_normal(seed, (n, s, D)) @ mix + 0.3)


def _max(a):
    return float(jnp.max(jnp.abs(a)))


# One jitted forward per model kind and one held-out input shape: the tests share compiles.
japply = jax.jit(lambda module, variables, x: module.apply(variables, x), static_argnums=0)
ncall = nnx.jit(lambda m, x: m(x))


def held_out():
    return inputs(99, 32, 8)


def reassociation_tol(y, n_products):
    """Train and serve use the same codes and scales; they differ only in the order of float
    sums (the served product may run tiled): a few ulps of each product's output."""
    return 8 * EPS32 * n_products * _max(y)


class LinenAttn(nn.Module):
    """Self-attention with 2 heads of 64 (out kernel ``[2, 64, 32]``: g32 divides head_dim)."""

    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=128, name="attn")(x)
        return nn.Dense(D, name="head")(nn.relu(h))


class NnxAttn(nnx.Module):
    """Self-attention with 4 heads of 48 (out kernel ``[4, 48, 32]``: g32 is adapted to 24)."""

    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(4, D, 192, decode=False, rngs=rngs)
        self.head = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.attn(x)))


@functools.cache
def linen_run():
    model = LinenAttn()
    x = inputs(0, 2)
    qmodel = jq.quantize_model(model, RULES, x)
    variables = jax.jit(model.init)(jax.random.key(1), x)
    return model, qmodel, variables, to_serving(qmodel, variables)


@functools.cache
def nnx_run():
    model = NnxAttn(nnx.Rngs(0))
    qmodel = jq.quantize_model(model, RULES, inputs(0, 2))
    return model, qmodel, to_serving(qmodel)




def check_grouped_kernel(w, q: QArray, g: int):
    """``q`` (int4) holds ``w [heads, head_dim, d]`` in groups of ``g`` along ``head_dim``: the
    scale is each group's absmax / 7 (so the groups are exactly these elements), and every
    element is within half its group's step."""
    w = np.asarray(w, np.float32)
    heads, hd, d = w.shape
    assert q.shape == w.shape and q.group_axis == 1 and q.group_size == g
    assert q.scale.shape == (heads, hd // g, d)
    amax = np.abs(w.reshape(heads, hd // g, g, d)).max(axis=2)
    np.testing.assert_allclose(np.asarray(q.scale), amax / 7.0, rtol=4 * EPS32)
    err = np.abs(w - np.asarray(q.dequantize(jnp.float32)))
    step = np.asarray(step_per_element(q))
    assert (err <= step / 2 * (1 + 4 * EPS32)).all()
    assert err.max() > 0  # it really quantized


# --- plans and report -----------------------------------------------------------------------------


def test_make_plan_groups_the_innermost_contracting_axis():
    plan = make_plan("out", "DenseGeneral", Op.DOT, (4, 24, 8), (0, 1), G32)
    assert plan.group_size == 24  # 32 adapted to a divisor of head_dim 24
    spec = plan.weight_spec()
    assert spec.group_axis == 1 and set(spec.channel_axes) == {0, 2}
    assert "group 24 (asked 32) along kernel axis 1" in plan.describe()
    # axes given in another order: still the innermost axis of the kernel's layout
    plan = make_plan("out", "Einsum", Op.EINSUM, (4, 24, 8), (1, 0), G32)
    assert plan.weight_spec().group_axis == 1 and plan.group_size == 24
    # a layer that contracts nothing can't have groups: named
    with pytest.raises(ValueError, match=r"^p: .*group_size=32.*contracts no axis"):
        make_plan("p", "Einsum", Op.EINSUM, (4, 8), (), G32)


def test_linen_attention_out_projection_groups_and_train_equals_serve():
    model, qmodel, variables, serving = linen_run()
    plans = layer_plans(qmodel)
    out = plans["attn/out"]
    assert out.kernel_shape == (2, 64, D) and out.contracting_axes == (0, 1)
    assert out.group_size == 32 and out.requested_group_size == 32
    assert "attn/out: DenseGeneral" in report(qmodel) and "group 32 (asked 32)" in report(qmodel)
    q = serving["params"]["attn"]["out"]["kernel"]
    check_grouped_kernel(variables["params"]["attn"]["out"]["kernel"], q, 32)
    x = held_out()
    y_train, y_serve = japply(qmodel, variables, x), japply(qmodel, serving, x)
    y_float = japply(model, variables, x)
    tol = reassociation_tol(y_train, 6)
    assert _max(y_train - y_serve) <= tol, (_max(y_train - y_serve), tol)
    assert _max(y_train - y_float) > 100 * tol  # the forward really is quantized
    # int4 codes (half a byte) and one f32 scale per 32 elements, kernel by kernel
    kernels = [lf for lf in jax.tree.leaves(serving, is_leaf=lambda a: isinstance(a, QArray))
               if isinstance(lf, QArray)]
    assert len(kernels) == 5
    for k in kernels:
        n = int(np.prod(k.shape))
        assert k.nbytes == n // 2 + 4 * (n // 32)
        assert k.nbytes < 0.16 * 4 * n


def test_nnx_attention_out_projection_adapted_group_and_train_equals_serve():
    model, qmodel, served = nnx_run()
    plans = layer_plans(qmodel)
    out = plans["attn/out"]
    assert out.kernel_shape == (4, 48, D) and out.contracting_axes == (0, 1)
    assert out.group_size == 24 and out.requested_group_size == 32
    assert "attn/out: LinearGeneral" in report(qmodel)
    assert "group 24 (asked 32) along kernel axis 1" in report(qmodel)
    q = served.attn.out.kernel.get_value()
    assert isinstance(served.attn.out.kernel, QKernel)
    check_grouped_kernel(qmodel.attn.out.kernel.get_value(), q, 24)
    x = held_out()
    y_train, y_serve, y_float = ncall(qmodel, x), ncall(served, x), ncall(model, x)
    tol = reassociation_tol(y_train, 6)
    assert _max(y_train - y_serve) <= tol, (_max(y_train - y_serve), tol)
    assert _max(y_train - y_float) > 100 * tol


# --- the dot_general with such an rhs -------------------------------------------------------------


@pytest.mark.parametrize("rows", [2, 40])  # few rows: the tiled decode path on CPU; many: not
@pytest.mark.parametrize("config", ["int4_g8", "w8a8_g8"])
def test_dot_general_grouped_over_two_contracting_axes(rows, config):
    """``x [rows, heads, hd] . w [heads, hd, d]``: train (float w) == serve (QArray w) == the
    definition (dequantize, then a float dot), weight-only and with int8 activations."""
    cfg = {
        "int4_g8": jq.weight_only("int4", group_size=8),
        "w8a8_g8": dataclasses.replace(jq.w8a8(), rhs=jq.QuantSpec(qtype="int8", group_size=8)),
    }[config]
    x = jnp.asarray(_normal(0, (rows, 3, 16)))
    w = jnp.asarray(_normal(1, (3, 16, 5)))
    dn = (((1, 2), (0, 1)), ((), ()))
    q = quantize_operand(w, cfg.rhs, (0, 1))
    assert q.scale.shape == (3, 2, 5) and q.group_axis == 1
    xhat = x if cfg.lhs is None else quantize_operand(x, cfg.lhs, (1, 2)).dequantize()
    definition = jax.lax.dot_general(xhat, q.dequantize(), dn,
                                     precision=jax.lax.Precision.HIGHEST)
    tol = 8 * EPS32 * 48 * float(jnp.max(jnp.abs(xhat)) * jnp.max(jnp.abs(w)))
    for y in (jq.dot_general(x, w, dn, config=cfg), jq.dot_general(x, q, dn, config=cfg),
              jax.jit(lambda a, b: jq.dot_general(a, b, dn, config=cfg))(x, q),
              dot_general_reference(x, w, dn, config=cfg)):
        assert _max(y - definition) <= tol, (_max(y - definition), tol)
    # straight-through gradient to the float kernel (as with one contracting axis)
    gw = jax.grad(lambda b: jnp.sum(jq.dot_general(x, b, dn, config=cfg)))(w)
    np.testing.assert_allclose(gw, jnp.broadcast_to(xhat.sum(0)[..., None], w.shape),
                               rtol=1e-5, atol=1e-5)


# --- GPTQ on the flattened view -------------------------------------------------------------------


def test_matrix_view_groups_map_back_exactly():
    """Round to nearest on the flattened ``[heads * head_dim, d]`` matrix (groups of ``g``
    consecutive rows) gives the kernel's own QArray, codes and scales."""
    _, qmodel, variables, serving = linen_run()
    plan = layer_plans(qmodel)["attn/out"]
    w = variables["params"]["attn"]["out"]["kernel"]
    assert matrix_view(plan).group_size == 32
    np.testing.assert_array_equal(to_matrix(plan, w), np.asarray(w).reshape(128, D))
    q, _ = quantize_layer(plan, w, None)
    ref = serving["params"]["attn"]["out"]["kernel"]
    assert jax.tree.structure(q) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)


def test_matrix_view_of_axes_contracted_in_another_order():
    """An einsum contracting the kernel ``[heads, hd, d]`` as ``(hd, heads)``: the view's rows
    are still ``heads``-major (groups are consecutive rows), the inputs' rows follow them
    (``rows @ w2`` is the product), and the view's rounding is the kernel's own."""
    eq = "bkh,hkd->bd"
    plan = make_plan("e", "Einsum", Op.EINSUM, (4, 24, 8), (1, 0), G32)
    w = jnp.asarray(_normal(2, (4, 24, 8)))
    x = jnp.asarray(_normal(3, (5, 24, 4)))
    np.testing.assert_allclose(einsum_rows(plan, eq, x) @ to_matrix(plan, w),
                               jnp.einsum(eq, x, w), rtol=1e-5, atol=1e-5)
    dn = (((1, 2), (1, 0)), ((), ()))
    np.testing.assert_allclose(dot_rows(plan, x, dn) @ to_matrix(plan, w),
                               jax.lax.dot_general(x, w, dn), rtol=1e-5, atol=1e-5)
    q, _ = quantize_layer(plan, w, None)
    ref = plan.quantize_kernel(w)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)


def test_gptq_on_attention_beats_rtn_and_serves_the_grouped_layout():
    model, qmodel, variables, rtn = linen_run()
    batches = [(inputs(10 + i, 32, 8),) for i in range(2)]
    gptq = calibrate_and_convert(qmodel, variables, batches)
    q = gptq["params"]["attn"]["out"]["kernel"]
    assert q.scale.shape == (2, 2, D) and q.group_axis == 1 and q.group_size == 32
    x = held_out()
    ref = japply(model, variables, x)
    err = lambda v: float(jnp.linalg.norm(japply(qmodel, v, x) - ref) / jnp.linalg.norm(ref))  # noqa: E731
    assert err(gptq) < 0.75 * err(rtn), (err(gptq), err(rtn))


def test_gptq_on_nnx_attention_beats_rtn():
    model, qmodel, rtn = nnx_run()
    batches = [(inputs(10 + i, 32, 8),) for i in range(2)]
    served = calibrate_and_convert(qmodel, batches)
    q = served.attn.out.kernel.get_value()
    assert q.scale.shape == (4, 2, D) and q.group_size == 24
    x = held_out()
    ref = ncall(model, x)
    err = lambda m: float(jnp.linalg.norm(ncall(m, x) - ref) / jnp.linalg.norm(ref))  # noqa: E731
    assert err(served) < 0.75 * err(rtn), (err(served), err(rtn))
