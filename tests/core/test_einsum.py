"""``jq.einsum``: subscripts map onto the right contraction, batch and output axes.

The quantized result is checked against ``jnp.einsum`` of operands quantized independently of
the parser (per index of every axis that is not summed), so a wrong contracting axis, a
dropped batch axis or a wrong output transpose all show up as errors far above the float
reassociation tolerance.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from tests.core.test_dot_general import assert_within, rand

SUBSCRIPTS = {
    # subscripts: (lhs shape, rhs shape)
    "bsd,dh->bsh": ((2, 3, 32), (32, 5)),
    "bhqd,bhkd->bhqk": ((2, 3, 4, 16), (2, 3, 6, 16)),  # attention scores
    "bhqk,bhkd->bhqd": ((2, 3, 4, 16), (2, 3, 16, 8)),  # attention x values
    "ij,jk->ki": ((6, 32), (32, 5)),  # output transposed
    "bij,bjk->kbi": ((2, 4, 32), (2, 32, 5)),  # batch moved to the middle
    "ijk,kjl->li": ((3, 4, 8), (8, 4, 5)),  # two contracting axes in different orders
    "hd,bsd->bsh": ((7, 16), (2, 3, 16)),  # weight on the left
}


def _summed(sub: str) -> tuple[str, str, str]:
    ins, out = sub.split("->")
    la, ra = ins.split(",")
    return la, ra, out


def _quantize_by_letters(x, letters: str, out: str, spec):
    """Quantize with a scale per index of every kept axis (the einsum's non-summed letters)."""
    if spec is None:
        return x
    keep = tuple(i for i, c in enumerate(letters) if c in out)
    return jq.quantize(x, jq.QuantSpec(qtype=spec.qtype, channel_axes=keep)).dequantize()


@functools.partial(jax.jit, static_argnums=(0, 1))
def _expected(sub, cfg, x, w):
    """``(jnp.einsum of the independently quantized operands, reassociation tolerance)``."""
    la, ra, out = _summed(sub)
    xhat = _quantize_by_letters(x, la, out, cfg.lhs if cfg else None)
    what = _quantize_by_letters(w, ra, out, cfg.rhs if cfg else None)
    k = int(np.prod([x.shape[i] for i, c in enumerate(la) if c not in out]))
    eps = float(jnp.finfo(jnp.float32).eps)
    hi = jax.lax.Precision.HIGHEST
    tol = 2 * (k + 4) * eps * jnp.einsum(sub, jnp.abs(xhat), jnp.abs(what), precision=hi)
    return jnp.einsum(sub, xhat, what, precision=hi), tol


@pytest.mark.parametrize("cfg_name", ["w8a8", "none"])
@pytest.mark.parametrize("sub", list(SUBSCRIPTS))
def test_einsum_matches_jnp(sub, cfg_name):
    cfg = jq.w8a8() if cfg_name == "w8a8" else None
    lshape, rshape = SUBSCRIPTS[sub]
    x, w = rand(0, lshape, 1.0), rand(1, rshape, 1.0, axis=len(rshape) - 1)
    y = jax.jit(lambda a, b: jq.einsum(sub, a, b, config=cfg))(x, w)
    expected, tol = _expected(sub, cfg, x, w)
    assert y.shape == expected.shape and y.dtype == jnp.float32
    assert_within(y, expected, tol, sub)
    if cfg is not None:  # and it really quantized
        assert float(jnp.max(jnp.abs(y - jnp.einsum(sub, x, w)))) > 0


def test_einsum_attention_runs_on_int8():
    from tests.core.test_dot_general import dot_eqns

    q, k = rand(0, (2, 3, 4, 16)), rand(1, (2, 3, 6, 16))
    dots = dot_eqns(lambda a, b: jq.einsum("bhqd,bhkd->bhqk", a, b, config=jq.w8a8()), q, k)
    assert dots and all(d == (jnp.int8, jnp.int8, jnp.int32) for d in dots), dots


def test_einsum_with_qarray_rhs():
    cfg = jq.weight_only("int4", group_size=16)
    x, w = rand(0, (2, 3, 32)), rand(1, (32, 5))
    wq = jq.core.quantize_operand(w, cfg.rhs, (0,))
    y = jax.jit(lambda a, b: jq.einsum("bsd,dh->bsh", a, b, config=cfg))(x, wq)
    expected = jnp.einsum("bsd,dh->bsh", x, wq.dequantize(), precision=jax.lax.Precision.HIGHEST)
    k, eps = x.shape[-1], float(jnp.finfo(jnp.float32).eps)
    tol = 2 * (k + 4) * eps * jnp.einsum("bsd,dh->bsh", jnp.abs(x), jnp.abs(wq.dequantize()))
    assert_within(y, expected, tol, "einsum QArray rhs")


@pytest.mark.parametrize(
    "sub,shapes,match",
    [
        ("ij,jk", ((2, 3), (3, 4)), "lhs,rhs->out"),
        ("ij,jk,kl->il", ((2, 3), (3, 4)), "two operands"),
        ("...j,jk->...k", ((2, 3), (3, 4)), "ellipsis"),
        ("ijk,jk->ik", ((2, 3), (3, 4)), "ranks"),
        ("iij,jk->ik", ((2, 2, 3), (3, 4)), "repeated"),
        ("ij,jk->iz", ((2, 3), (3, 4)), "neither operand"),
        ("ij,jk->k", ((2, 3), (3, 4)), "summed alone"),
    ],
)
def test_einsum_bad_subscripts(sub, shapes, match):
    x, w = rand(0, shapes[0]), rand(1, shapes[1])
    with pytest.raises(ValueError, match=match):
        jq.einsum(sub, x, w, config=jq.w8a8())
