"""``jq.quantize_model`` on Flax models written as the Flax docs write them (linen and NNX).

Checked for int8 and int4-g32 weight-only and w8a8: the quantized forward is within the bound
of the quantization steps of the float forward and differs from it; gradients reach the float
params (QAT); train -> convert -> serve gives the same outputs up to float reassociation; the
serving params hold packed QArrays; errors name the module path.
"""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.core import QArray
from jaxquant.nn.any_model import layer_plans, report, to_serving
from jaxquant.nn.layer_quant import adapt_group
from jaxquant.nn.nnx_model import QKernel
from tests.nn.helpers import step_per_element

EPS32 = float(np.finfo(np.float32).eps)
CONFIGS = {
    "int8": jq.weight_only("int8"),
    "int4_g32": jq.weight_only("int4", group_size=32),
    "w8a8": jq.w8a8(),
}


# --- models, as the Flax docs write them -----------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(96)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    """The MNIST CNN of the Flax docs, smaller."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(features=16, kernel_size=(3, 3))(x))
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(features=64, kernel_size=(3, 3))(x))
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(features=10)(x)


class Block(nn.Module):
    """Heads by DenseGeneral and Einsum, merged back by a DenseGeneral over two axes."""

    @nn.compact
    def __call__(self, x):  # x: [b, s, 64]
        q = nn.Einsum((64, 4, 16), "bsd,dhk->bshk")(x)
        v = nn.DenseGeneral((4, 16))(x)
        h = nn.tanh(q) * v
        return nn.DenseGeneral(64, axis=(-2, -1))(h)  # contracts two axes: no groups


# Block's output projection contracts (heads, head_dim): a per-channel rule for it goes first.
BLOCK_RULES = (jq.QuantRule(r"DenseGeneral_1", jq.weight_only("int4")),)

LINEN = {
    "mlp": (MLP, (4, 48)),
    "cnn": (CNN, (2, 12, 12, 3)),
    "block": (Block, (2, 5, 64)),
}


def rules_for(name, cfg_name):
    cfg = CONFIGS[cfg_name]
    if name == "block" and cfg_name == "int4_g32":
        return (*BLOCK_RULES, jq.QuantRule(".*", cfg))
    return (jq.QuantRule(".*", cfg),)


def _linen(name, cfg_name):
    cls, shape = LINEN[name]
    model = cls()
    x = jax.random.normal(jax.random.key(1), shape)
    qmodel = jq.quantize_model(model, rules_for(name, cfg_name), x)
    variables = model.init(jax.random.key(0), x)
    return model, qmodel, variables, x


def _max(a):
    return float(jnp.max(jnp.abs(a)))


# --- single layers: the error bound from the quantization steps --------------------------------

LAYERS = {
    "dense": (lambda: nn.Dense(24), (6, 64)),
    "dense_general": (lambda: nn.DenseGeneral((3, 8)), (6, 5, 48)),
    "einsum": (lambda: nn.Einsum((40, 3, 8), "bd,dhk->bhk"), (6, 40)),
    "conv": (lambda: nn.Conv(12, (3, 3)), (2, 7, 7, 64)),
    "depthwise_conv": (lambda: nn.Conv(16, (3, 3), feature_group_count=16), (2, 7, 7, 16)),
}




def _act_half_step(x, kind):
    """Half the int8 step of the activations as the layer quantizes them (a scale per row of
    the contracting axes; per example for a conv)."""
    axes = (1, 2, 3) if kind.endswith("conv") else (-1,)
    return jnp.broadcast_to(jnp.max(jnp.abs(x), axis=axes, keepdims=True) / 127 / 2, x.shape)


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_single_layer_error_is_within_the_quantization_steps(kind, cfg_name):
    make, shape = LAYERS[kind]
    model = make()
    x = jax.random.normal(jax.random.key(1), shape)
    qmodel = jq.quantize_model(model, [jq.QuantRule(".*", CONFIGS[cfg_name])], x)
    params = model.init(jax.random.key(0), x)["params"]
    serving = to_serving(qmodel, {"params": params})["params"]
    q = serving["kernel"]
    assert isinstance(q, QArray)
    w_hat = q.dequantize()
    # the float layer is linear in (input, kernel): run it on |x| and the steps, bias 0
    lin = lambda inp, k: model.apply(
        {"params": {**params, "kernel": k, "bias": 0 * params["bias"]}}, inp
    )  # noqa: E731
    assert float(jnp.max(jnp.abs(w_hat - params["kernel"]) - step_per_element(q) / 2)) <= 1e-6
    bound = lin(jnp.abs(x), step_per_element(q) / 2)
    if CONFIGS[cfg_name].lhs is not None:
        bound = bound + lin(_act_half_step(x, kind), jnp.abs(w_hat))
    slack = 8 * EPS32 * lin(jnp.abs(x), jnp.abs(params["kernel"])) + 1e-6
    y_float = model.apply({"params": params}, x)
    y_q = qmodel.apply({"params": params}, x)
    err = jnp.abs(y_q - y_float)
    assert bool(jnp.all(err <= bound + slack)), float(jnp.max(err - bound - slack))
    assert _max(err) > 1e-4 * _max(y_float)  # the quantization is really applied


# --- whole linen models -------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("name", list(LINEN))
def test_linen_train_convert_serve(name, cfg_name):
    model, qmodel, variables, x = _linen(name, cfg_name)
    assert isinstance(qmodel, type(model)) and isinstance(qmodel, nn.Module)
    # init: the same param tree as the model's
    qvars = qmodel.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, qvars) == jax.tree.map(jnp.shape, variables)
    y_float = model.apply(variables, x)
    y_train = qmodel.apply(variables, x)
    assert _max(y_train - y_float) > 1e-4 * _max(y_float)
    # QAT: gradients reach every float kernel (straight through)
    grads = jax.grad(lambda p: jnp.sum(qmodel.apply({"params": p}, x) ** 2))(variables["params"])
    kernels = [g for k, g in jax.tree_util.tree_leaves_with_path(grads) if "kernel" in str(k[-1])]
    assert kernels and all(bool(jnp.all(jnp.isfinite(g))) and _max(g) > 0 for g in kernels)
    # convert -> serve: the same outputs up to float reassociation, jitted or not
    serving = to_serving(qmodel, variables)
    tol = 64 * EPS32 * max(1.0, _max(y_train))
    np.testing.assert_allclose(qmodel.apply(serving, x), y_train, rtol=0, atol=tol)
    served = jax.jit(qmodel.apply)(serving, x)
    np.testing.assert_allclose(served, y_train, rtol=0, atol=tol)
    # every planned layer is a packed QArray in the serving params
    for path, plan in layer_plans(qmodel).items():
        node = serving["params"]
        for p in path.split("/"):
            node = node[p]
        q = node["kernel"]
        assert isinstance(q, QArray) and q.shape == plan.kernel_shape
        assert q.qtype == plan.config.rhs.qtype


class Encoder(nn.Module):
    """A model with a field, a second method and a parent-visible name."""

    hidden: int = 32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(self.hidden)(x)))

    def encode(self, x):
        return 2 * self(x)


class Outer(nn.Module):
    inner: nn.Module  # a quantized model passed in as a field

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(self.inner(x))


def test_linen_result_is_a_module_of_the_users_class():
    x = jax.random.normal(jax.random.key(1), (4, 16))
    model = Encoder(hidden=24)
    qmodel = jq.quantize_model(model, [jq.QuantRule(".*", jq.w8a8())], x)
    assert isinstance(qmodel, Encoder) and isinstance(qmodel, nn.Module)
    assert qmodel.hidden == 24 and type(qmodel).__name__ == "Encoder"
    variables = model.init(jax.random.key(0), x)
    y_float = model.apply(variables, x)
    y_q = qmodel.apply(variables, x)
    assert _max(y_q - y_float) > 1e-4 * _max(y_float)  # quantized
    # every way in runs quantized: method by name, by the original function, jitted
    for method in ("encode", Encoder.encode, lambda m, v: m.encode(v)):
        np.testing.assert_array_equal(qmodel.apply(variables, x, method=method), 2 * y_q)
    np.testing.assert_allclose(jax.jit(qmodel.apply)(variables, x), y_q, rtol=0, atol=1e-6)
    # re-quantizing starts from the user's class, not from the quantized one
    again = jq.quantize_model(qmodel, [jq.QuantRule("Dense_1", jq.w8a8())], x)
    assert set(layer_plans(again)) == {"Dense_1"} and type(again).__mro__[1] is Encoder
    # nested as a field of a larger model: the same param tree, its layers quantized
    outer_f, outer_q = Outer(model), Outer(qmodel)
    ov = outer_f.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, outer_q.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, ov
    )
    head = {"params": ov["params"]["Dense_0"]}
    want = nn.Dense(3).apply(head, qmodel.apply({"params": ov["params"]["inner"]}, x))
    np.testing.assert_allclose(outer_q.apply(ov, x), want, rtol=0, atol=1e-6)
    assert _max(outer_q.apply(ov, x) - outer_f.apply(ov, x)) > 0

    # ... and created inside a compact parent: named as the user's class would be
    class Parent(nn.Module):
        @nn.compact
        def __call__(self, v):
            return qmodel.copy()(v)

    pv = Parent().init(jax.random.key(0), x)
    assert set(pv["params"]) == {"Encoder_0"}
    inner = {"params": pv["params"]["Encoder_0"]}
    np.testing.assert_array_equal(Parent().apply(pv, x), qmodel.apply(inner, x))
    # serving variables through the same module, nested too
    serving = to_serving(qmodel, inner)
    np.testing.assert_allclose(
        qmodel.apply(serving, x), qmodel.apply(inner, x), rtol=0, atol=64 * EPS32
    )
    np.testing.assert_allclose(
        Parent().apply({"params": {"Encoder_0": serving["params"]}}, x),
        qmodel.apply(inner, x),
        rtol=0,
        atol=64 * EPS32,
    )
    with pytest.raises(ValueError, match="not a model from jq.quantize_model"):
        layer_plans(model)


def test_linen_int4_serving_bytes_and_adapted_groups():
    model, qmodel, variables, x = _linen("mlp", "int4_g32")
    serving = to_serving(qmodel, variables)
    # Dense_0 contracts 48: the group is adapted to 24; the others keep 32
    assert {p: pl.group_size for p, pl in layer_plans(qmodel).items()} == {
        "Dense_0": 24,
        "Dense_1": 32,
        "Dense_2": 32,
    }
    assert all(pl.requested_group_size == 32 for pl in layer_plans(qmodel).values())
    assert "group 24 (asked 32)" in report(qmodel)
    for path, plan in layer_plans(qmodel).items():
        q = serving["params"][path]["kernel"]
        n = int(np.prod(q.shape))
        assert q.qvalue.dtype == jnp.uint8 and q.qvalue.size == n // 2  # two codes per byte
        assert q.nbytes == n // 2 + 4 * n // plan.group_size  # codes + f32 scales, nothing more
        f32 = 4 * n
        assert q.nbytes <= f32 * (1 / 8 + 1 / plan.group_size)  # f32 scale per group: 1/g
    q = serving["params"]["Dense_1"]["kernel"]
    assert q.nbytes / (4 * np.prod(q.shape)) < 0.16


@pytest.mark.parametrize(("g", "n", "want"), [(32, 48, 24), (32, 64, 32), (32, 3, 3), (16, 49, 7)])
def test_adapt_group_is_the_largest_divisor_not_above_the_request(g, n, want):
    assert adapt_group(n, g) == want


def test_conv_w8a8_serves_on_integer_codes():
    model, qmodel, variables, x = _linen("cnn", "w8a8")
    serving = to_serving(qmodel, variables)
    jaxpr = str(jax.make_jaxpr(qmodel.apply)(serving, x))
    assert "conv_general_dilated" in jaxpr
    convs = [ln for ln in jaxpr.splitlines() if "conv_general_dilated" in ln]
    assert all("i32[" in ln for ln in convs), convs  # int8 x int8 -> int32 convolutions


# --- errors name the module path ---------------------------------------------------------------


class WithConvTranspose(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.ConvTranspose(4, (3, 3))(nn.Conv(4, (3, 3))(x))


def test_linen_errors_name_the_module_path():
    rule = [jq.QuantRule(".*", jq.weight_only("int8"))]
    with pytest.raises(ValueError, match=r"ConvTranspose_0: rule '\.\*' matches this ConvT"):
        jq.quantize_model(WithConvTranspose(), rule, jnp.zeros((1, 6, 6, 2)))
    # groups over two contracting axes tile the innermost one (head_dim 16: 32 adapted)
    x = jnp.zeros((2, 5, 64))
    g32 = [jq.QuantRule(".*", CONFIGS["int4_g32"])]
    assert layer_plans(jq.quantize_model(Block(), g32, x))["DenseGeneral_1"].group_size == 16
    # a None rule first keeps the unsupported layer float and the rest quantizes
    ok = [jq.QuantRule(r"^ConvTranspose_0$", None), *rule]
    qm = jq.quantize_model(WithConvTranspose(), ok, jnp.zeros((1, 6, 6, 2)))
    assert set(layer_plans(qm)) == {"Conv_0"}
    with pytest.raises(ValueError, match="flax.linen.Module or a flax.nnx.Module"):
        jq.quantize_model(object(), rule)


# --- NNX ---------------------------------------------------------------------------------------


class NnxMLP(nnx.Module):
    def __init__(self, din, dhidden, dout, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(din, dhidden, rngs=rngs)
        self.linear2 = nnx.Linear(dhidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.linear2(nnx.relu(self.linear1(x)))


class NnxCNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 16, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
        self.heads = nnx.Einsum("bd,dhk->bhk", (32, 4, 8), (4, 8), rngs=rngs)
        self.out = nnx.LinearGeneral((4, 8), 10, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = jnp.mean(x, axis=(1, 2))
        return self.out(nnx.relu(self.heads(x)))


NNX_RULES = {
    "mlp": lambda c: [jq.QuantRule(".*", CONFIGS[c])],
    # `out` contracts two axes: per-channel weights for it when the rule has groups
    "cnn": lambda c: (
        [jq.QuantRule("^out$", jq.weight_only("int4")), jq.QuantRule(".*", CONFIGS[c])]
        if c == "int4_g32"
        else [jq.QuantRule(".*", CONFIGS[c])]
    ),
}


def _nnx(name):
    if name == "mlp":
        return NnxMLP(48, 64, 10, rngs=nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (4, 48))
    return NnxCNN(rngs=nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (2, 8, 8, 3))


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_nnx_train_convert_serve(name, cfg_name):
    model, x = _nnx(name)
    y_float = model(x)
    qmodel = jq.quantize_model(model, NNX_RULES[name](cfg_name), x)
    assert type(qmodel) is type(model)
    np.testing.assert_array_equal(model(x), y_float)  # the original is untouched
    y_train = qmodel(x)
    assert _max(y_train - y_float) > 1e-4 * _max(y_float)
    # float params, the same as the model's; gradients reach them
    params = nnx.state(qmodel, nnx.Param)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, nnx.state(model, nnx.Param))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(qmodel)
    kernels = [g for k, g in jax.tree_util.tree_leaves_with_path(grads) if "kernel" in str(k)]
    assert kernels and all(_max(g) > 0 and bool(jnp.all(jnp.isfinite(g))) for g in kernels)
    # serve
    serving = to_serving(qmodel)
    tol = 64 * EPS32 * max(1.0, _max(y_train))
    np.testing.assert_allclose(serving(x), y_train, rtol=0, atol=tol)
    np.testing.assert_allclose(nnx.jit(lambda m, v: m(v))(serving, x), y_train, rtol=0, atol=tol)
    plans = layer_plans(qmodel)
    kernels = nnx.state(serving, QKernel)
    assert len(jax.tree.leaves(kernels, is_leaf=lambda v: isinstance(v, QArray))) == len(plans)
    float_paths = [
        str(k) for k, _ in jax.tree_util.tree_leaves_with_path(nnx.state(serving, nnx.Param))
    ]
    assert not [p for p in float_paths if "kernel" in p]  # no float copy of a quantized kernel


def test_a_rule_that_matches_no_layer_warns():
    x = jnp.ones((2, 48))
    rules = [jq.QuantRule("Dense_", jq.w8a8()), jq.QuantRule("Dnese_9", None)]
    with pytest.warns(UserWarning, match=r"rules matched no layer: \['Dnese_9'\]"):
        jq.quantize_model(MLP(), rules, x)
    model, x = _nnx("mlp")
    with pytest.warns(UserWarning, match=r"\['lin1'\]"):
        jq.quantize_model(model, [jq.QuantRule("lin1", jq.w8a8())], x)


def test_nnx_errors_name_the_module_path():
    class WithConvT(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.ConvTranspose(4, 4, kernel_size=(3, 3), rngs=rngs)
            self.proj = nnx.Linear(4, 8, rngs=rngs)

        def __call__(self, x):
            return self.proj(self.up(x))

    m = WithConvT(nnx.Rngs(0))
    t = jnp.zeros((1, 5, 5, 4))
    with pytest.raises(ValueError, match=r"up: rule '\.\*' matches this ConvTranspose"):
        jq.quantize_model(m, [jq.QuantRule(".*", jq.w8a8())], t)
    q = jq.quantize_model(m, [jq.QuantRule("^up$", None), jq.QuantRule(".*", jq.w8a8())], t)
    assert set(layer_plans(q)) == {"proj"}
    cnn, x = _nnx("cnn")
    # out contracts (4, 8): groups tile the innermost axis, 32 adapted to 8
    g32 = jq.quantize_model(cnn, [jq.QuantRule(".*", CONFIGS["int4_g32"])], x)
    assert layer_plans(g32)["out"].group_size == 8


def test_top_level_import_stays_without_flax():
    code = (
        "import sys, jaxquant as jq; assert 'flax' not in sys.modules, 'eager flax'; "
        "assert 'QuantRule' in dir(jq); jq.QuantRule; assert 'flax' in sys.modules"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
