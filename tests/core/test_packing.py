"""Sub-byte packing: pack then unpack is the identity, with the documented bit layout."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxquant as jq
from jaxquant.core.packing import packed_length


def code_range(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@st.composite
def codes_case(draw):
    bits = draw(st.sampled_from([2, 4]))
    signed = draw(st.booleans())
    # A few shapes (each new shape compiles): lengths 1..9, multiples of 4 and not.
    shape = draw(st.sampled_from([(9,), (3, 5), (2, 3, 8)]))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    lo, hi = code_range(bits, signed)
    codes = draw(hnp.arrays(np.int8, shape, elements=st.integers(lo, hi)))
    return bits, signed, axis, codes


def _reference_pack(codes, bits, axis):
    """Numpy reference: element k*i + j of `axis` goes to bits [bits*j, bits*(j+1)) of byte i."""
    k = 8 // bits
    c = np.moveaxis(codes.astype(np.int64) & ((1 << bits) - 1), axis, -1)
    n = c.shape[-1]
    out = np.zeros(c.shape[:-1] + (-(-n // k),), np.int64)
    for e in range(n):
        out[..., e // k] |= c[..., e] << (bits * (e % k))
    return np.moveaxis(out.astype(np.uint8), -1, axis)


@given(case=codes_case())
def test_pack_unpack_is_identity(case):
    bits, signed, axis, codes = case
    n = codes.shape[axis]
    packed = jq.pack(codes, bits, axis)
    assert packed.dtype == jnp.uint8
    expected_shape = list(codes.shape)
    expected_shape[axis] = packed_length(n, bits)
    assert packed.shape == tuple(expected_shape)  # ceil(n * bits / 8) bytes: padding included
    np.testing.assert_array_equal(np.asarray(packed), _reference_pack(codes, bits, axis))
    back = jq.unpack(packed, bits, axis, n, signed=signed)
    assert back.dtype == jnp.int8 and back.shape == codes.shape
    np.testing.assert_array_equal(np.asarray(back), codes)


class PackUnderJitTest(chex.TestCase):
    """pack / unpack run jitted and not (chex variants), against the numpy reference layout."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(bits=[2, 4], signed=[True, False], n=[5, 8])  # 5: a partial byte
    def test_pack_unpack(self, bits, signed, n):
        lo, hi = code_range(bits, signed)
        codes = (np.arange(3 * n).reshape(3, n) % (hi - lo + 1) + lo).astype(np.int8)
        packed = self.variant(lambda c: jq.pack(c, bits, -1))(codes)
        chex.assert_type(packed, jnp.uint8)
        chex.assert_shape(packed, (3, packed_length(n, bits)))
        np.testing.assert_array_equal(np.asarray(packed), _reference_pack(codes, bits, -1))
        round_trip = self.variant(
            lambda c: jq.unpack(jq.pack(c, bits, 1), bits, 1, n, signed=signed)
        )
        back = round_trip(codes)
        chex.assert_type(back, jnp.int8)
        chex.assert_trees_all_equal(back, codes)


def test_padding_is_zero_and_ignored():
    codes = np.array([[-1, 1, -2]], np.int8)  # 3 int2 codes: one byte with one padding slot
    packed = np.asarray(jq.pack(codes, 2, 1))
    assert packed.shape == (1, 1)
    assert packed[0, 0] >> 6 == 0  # padding slot holds zero bits
    assert packed[0, 0] == 0b00_10_01_11  # little-endian: first code in the low bits
    np.testing.assert_array_equal(np.asarray(jq.unpack(packed, 2, 1, 3, signed=True)), codes)


def test_only_low_bits_are_kept():
    """Signed and unsigned views of the same nibble pack to the same byte."""
    signed = np.array([-8, -1, 0, 7], np.int8)
    unsigned = np.array([8, 15, 0, 7], np.uint8)
    np.testing.assert_array_equal(
        np.asarray(jq.pack(signed, 4, 0)), np.asarray(jq.pack(unsigned, 4, 0))
    )
    np.testing.assert_array_equal(
        np.asarray(jq.unpack(jq.pack(signed, 4, 0), 4, 0, 4, signed=False)), unsigned
    )


@pytest.mark.parametrize("bits", [0, 3, 8])  # 1 is the binary format's sign bit
def test_unsupported_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        jq.pack(np.zeros(8, np.int8), bits, 0)
    with pytest.raises(ValueError, match="bits"):
        jq.unpack(np.zeros(8, np.uint8), bits, 0, 8, signed=True)


@pytest.mark.parametrize("qtype", ["int2", "int3", "int4", "nf4", "fp4_e2m1"])
def test_qarray_codes_survive_packing(qtype):
    """Every code of the format (int3 included, in a nibble) survives pack -> unpack in a QArray."""
    qt = jq.get_qtype(qtype)
    x = np.random.default_rng(0).standard_normal((2, 8, 3)).astype(np.float32)
    spec = jq.QuantSpec(qtype=qtype, channel_axes=(0, 1))  # packs the axis of 3: padded
    unpacked = jq.quantize(x, spec, pack=False)
    packed = jq.quantize(x, spec)
    assert packed.pack_axis == 2
    assert packed.qvalue.shape == (2, 8, packed_length(3, qt.storage_bits))
    np.testing.assert_array_equal(np.asarray(packed.codes()), np.asarray(unpacked.qvalue))
    codes = np.asarray(unpacked.qvalue)
    lo = -qt.qmax if qt.kind == "int" else 0
    assert codes.min() >= lo and codes.max() <= qt.qmax
