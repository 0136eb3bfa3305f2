"""Double quantization (QLoRA): the error bound, the storage, the layout, pytree and jit.

The bound checked element by element (see ``jaxquant/core/double_quant.py``): with ``s`` the
exact block absmax, ``g`` the gap of the nf4 grid around ``x / s`` and ``s2`` the second-level
scale of the block's scale block, ``|x - x_hat| <= s g / 2 + s2 / 2``; and on the scales alone
``|s - s_hat| <= s2 / 2``. Everything on the right is recomputed here in numpy from ``x``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.core import QuantSpec, dot_general, quantize
from jaxquant.core.double_quant import SCALE_QMAX, DoubleQuantArray, double_quantize
from jaxquant.core.qtypes import NF4_CODEBOOK
from tests.core.helpers import EPS32

CB = np.asarray(NF4_CODEBOOK, np.float64)

# One compile per shape instead of one per op (op-by-op dispatch is the slow part on CPU).
_dq = jax.jit(double_quantize, static_argnames=("qtype", "block_size", "axis", "scale_block_size"))
_deq = jax.jit(lambda d: d.dequantize())
_scales = jax.jit(lambda d: d.block_scales())


def _heavy(shape, seed=0):
    """Student-t weights with a spread of block absmax (what makes the 8-bit scale error bite)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=shape) * 0.02
    x *= np.exp(rng.normal(0, 0.7, size=(1, shape[1])))  # columns of different magnitude
    return x.astype(np.float32)


def _reference(x, block, sblock):
    """numpy: block absmax ``s [d_in/block, d_out]``, and ``s2`` per block scale (same shape)."""
    d_in, d_out = x.shape
    s = np.abs(x.astype(np.float64)).reshape(d_in // block, block, d_out).max(1)
    flat = s.reshape(-1)
    dev = flat - flat.astype(np.float32).mean(dtype=np.float32)
    m = -(-flat.size // sblock)
    dev = np.pad(dev, (0, m * sblock - flat.size)).reshape(m, sblock)
    s2 = np.abs(dev).max(1) / SCALE_QMAX
    s2_per_scale = np.repeat(s2, sblock)[: flat.size].reshape(s.shape)
    return s, s2, s2_per_scale


def _half_gap(v):
    """Half the nf4 grid gap around each ``v`` in ``[-1, 1]``."""
    i = np.clip(np.searchsorted(CB, v, side="right") - 1, 0, len(CB) - 2)
    return (CB[i + 1] - CB[i]) / 2


# 5184 block scales (not a multiple of 256: a padded last scale block) and 2 x 24 = 48 scales
# (one short scale block).
@pytest.mark.parametrize("shape,block,sblock", [((576, 576), 64, 256), ((128, 24), 64, 256),
                                                ((256, 40), 32, 16)])
def test_error_bound_from_the_nf4_step_and_the_8bit_scale(shape, block, sblock):
    x = _heavy(shape)
    dq = _dq(x, "nf4", block_size=block, scale_block_size=sblock)
    s, s2, s2e = _reference(x, block, sblock)
    # the stored second-level scales are the reference ones
    # (up to the rounding up to 17 significant bits, never down)
    got = np.asarray(dq.scale_scale, np.float64)
    assert np.all(got >= s2 * (1 - 1e-6)) and np.all(got <= s2 * (1 + 2.0**-16) + 1e-30)
    # level 2: the block scales within half an 8-bit step
    s_hat = np.asarray(_scales(dq), np.float64)
    slack = 4 * EPS32 * s.max()
    assert np.all(np.abs(s_hat - s) <= s2e / 2 + slack)
    # both levels: per element
    x_hat = np.asarray(_deq(dq), np.float64)
    se = np.repeat(s, block, axis=0)
    v = np.where(se > 0, x / np.where(se > 0, se, 1), 0)
    bound = se * _half_gap(v) + np.repeat(s2e, block, axis=0) / 2 + slack
    err = np.abs(x_hat - x)
    assert np.all(err <= bound), float((err - bound).max())
    # the scale error really enters: the bound of the nf4 step alone is exceeded somewhere
    # unless the scales were exact, and the total error is not absurdly below the bound
    assert err.max() > 0.25 * bound.max()
    n = x.size
    assert dq.nbytes == n // 2 + n // block + 4 * -(-(n // block) // sblock) + 4


def test_codes_are_plain_blockwise_nf4():
    """Double quantization touches the scales only: the packed codes are those of the plain
    block-wise nf4 QArray, and with float32 scales both dequantize alike."""
    x = _heavy((256, 48), seed=1)
    spec = QuantSpec(qtype="nf4", channel_axes=(1,), group_size=64, group_axis=0)
    q = jax.jit(lambda a: quantize(a, spec))(x)
    dq = _dq(x, "nf4", block_size=64)
    np.testing.assert_array_equal(np.asarray(dq.qvalue), np.asarray(q.qvalue))
    assert dq.qvalue.dtype == jnp.uint8 and dq.qvalue.shape == (128, 48)  # two codes per byte
    assert dq.scale_codes.dtype == jnp.int8 and dq.scale_codes.shape == q.scale.shape
    qa = dq.to_qarray()
    assert (qa.qtype, qa.shape, qa.group_size, qa.pack_axis) == ("nf4", (256, 48), 64, 0)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda d: d.to_qarray().dequantize())(dq)),
                                  np.asarray(_deq(dq)))


@pytest.mark.parametrize("shape", [(576, 576), (576, 192), (576, 1536), (1536, 576)])
def test_bytes_per_param_of_smollm2_kernels(shape):
    """Measured from the arrays: codes + 8-bit scale codes + second-level scales + mean."""
    dq = jax.eval_shape(double_quantize, jax.ShapeDtypeStruct(shape, jnp.float32))
    n = int(np.prod(shape))
    nblocks = n // 64
    want = n // 2 + nblocks + 4 * -(-nblocks // 256) + 4
    assert dq.nbytes == want
    assert dq.nbytes / n <= 0.56
    assert dq.bits_per_element == pytest.approx(8 * want / n)
    spec = QuantSpec(qtype="nf4", channel_axes=(1,), group_size=64, group_axis=0)
    plain = jax.eval_shape(lambda a: quantize(a, spec), jax.ShapeDtypeStruct(shape, jnp.float32))
    assert plain.nbytes / n == pytest.approx(0.5625)  # what double quantization saves from


def test_pytree_jit_and_serving():
    x = _heavy((64, 8), seed=3)
    dq = double_quantize(x)  # eager
    leaves, treedef = jax.tree.flatten(dq)
    assert [np.dtype(a.dtype) for a in leaves] == [np.uint8, np.int8, np.float32, np.float32]
    back = jax.tree.unflatten(treedef, leaves)
    assert isinstance(back, DoubleQuantArray) and back.shape == dq.shape
    jdq = jax.jit(lambda a: double_quantize(a))(x)
    for a, b in zip(jax.tree.leaves(jdq), leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ref = np.asarray(dq.dequantize())
    # k * s2 is exact, so an fma of mean + k * s2 under jit gives the eager bits
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda d: d.dequantize())(dq)), ref)
    np.testing.assert_array_equal(np.asarray(dq.to_qarray().dequantize()), ref)
    # a pre-quantized rhs of jaxquant.dot_general, through its first-level QArray
    lhs = jnp.asarray(np.random.default_rng(0).normal(size=(3, 64)), jnp.float32)
    y = dot_general(lhs, dq.to_qarray(), (((1,), (0,)), ((), ())))
    np.testing.assert_allclose(np.asarray(y), np.asarray(lhs) @ ref, rtol=1e-5, atol=1e-6)


def test_zero_and_constant_tensors_are_exact():
    z = _dq(jnp.zeros((128, 16)))
    assert np.all(np.asarray(_deq(z)) == 0) and np.all(np.isfinite(_scales(z)))
    # nf4 grid values with absmax 1.5 in every block: s - mean = 0, s2 = 0, the scales and
    # the values come back exactly
    x = np.tile(CB.astype(np.float32)[:, None] * np.float32(1.5), (8, 8))
    dq = _dq(x, block_size=64)
    assert np.all(np.asarray(dq.scale_scale) == 0)
    np.testing.assert_array_equal(np.asarray(_scales(dq)), np.full((2, 8), 1.5, np.float32))
    np.testing.assert_array_equal(np.asarray(_deq(dq)), x)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(block_size=48), "does not divide"),
        (dict(block_size=0), "block_size"),
        (dict(scale_block_size=0), "scale_block_size"),
        (dict(axis=2), "out of range"),
    ],
)
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        double_quantize(jnp.ones((128, 8)), **kwargs)
