"""The one einsum-string parser: dimension numbers, output permutation, bias shapes, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.core import parse_einsum

CASES = [
    "bsd,dh->bsh",
    "bhk,hkf->bf",
    "bsd,dhk->bshk",
    "bqhd,bkhd->bhqk",
    "ij,kj->ki",
    "bhqk,bkhd->bqhd",
]


def _rand(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape)


def _shapes(eq):
    sizes = {c: 2 + i for i, c in enumerate(sorted(set(eq) - set(",->")))}
    la, ra = eq.split("->")[0].split(",")
    return tuple(sizes[c] for c in la), tuple(sizes[c] for c in ra)


@pytest.mark.parametrize("eq", CASES)
def test_dimension_numbers_and_perm_reproduce_jnp_einsum(eq):
    ls, rs = _shapes(eq)
    x, w = _rand(ls, 0), _rand(rs, 1)
    spec = parse_einsum(eq, len(ls), len(rs))
    y = jnp.transpose(jax.lax.dot_general(x, w, spec.dimension_numbers), spec.output_perm)
    ref = jnp.einsum(eq, x, w)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_contracting_axes_pair_up_in_kernel_order():
    spec = parse_einsum("bkh,hkf->bf")  # lhs order (k, h), rhs order (h, k)
    assert spec.contracting == ("h", "k")
    assert spec.rhs_contracting == (0, 1) and spec.lhs_contracting == (2, 1)
    (lc, rc), _ = spec.dimension_numbers  # the dot's pairs: lhs order
    assert lc == (1, 2) and rc == (1, 0)


def test_rhs_in_output_gives_bias_shapes():
    assert parse_einsum("bhk,hkf->bf").rhs_in_output((2, 8, 4)) == ((4,), (1, 4))
    assert parse_einsum("bsd,dhk->bshk").rhs_in_output((16, 3, 4)) == ((3, 4), (1, 1, 3, 4))


@pytest.mark.parametrize(
    "eq,ranks,match",
    [
        ("...d,dh->...h", (2, 2), "ellipsis"),
        ("bd,dh", (2, 2), "two operands"),
        ("bd,dh,hk->bk", (2, 2), "two operands"),
        ("bsd,dh->bsh", (2, 2), "ranks"),
        ("bdd,dh->bh", (3, 2), "repeated"),
        ("bd,dh->bz", (2, 2), "neither"),
        ("bsd,dh->bh", (3, 2), "summed alone"),
    ],
)
def test_bad_strings_raise(eq, ranks, match):
    with pytest.raises(ValueError, match=match):
        parse_einsum(eq, *ranks)
