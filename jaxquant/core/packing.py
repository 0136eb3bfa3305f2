"""Sub-byte packing: two 4-bit, four 2-bit or eight 1-bit codes per byte, jit-friendly.

Codes are packed along one axis (``axis``): element ``k * i + j`` of that axis goes to bits
``[bits * j, bits * (j + 1))`` of byte ``i`` (little-endian within the byte, like GGUF/GPTQ).
An axis whose length is not a multiple of ``k = 8 // bits`` is zero-padded; :func:`unpack`
slices the padding off again.

2- and 4-bit fields hold the low bits of the code (two's complement; unpacking sign-extends
signed codes). A 1-bit field holds ``code > 0``: a signed unpack gives the sign code
``2 b - 1`` in ``{-1, +1}`` (the ``binary`` format, which has no zero), an unsigned one ``b``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BITS = (1, 2, 4)


def _check_bits(bits: int, what: str) -> None:
    if bits not in BITS:
        raise ValueError(f"{what} supports bits in {BITS}, got {bits}.")


def packed_length(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits along an axis."""
    k = 8 // bits
    return -(-n // k)


def pack(codes: jax.Array, bits: int, axis: int) -> jax.Array:
    """Packs integer codes into ``uint8``.

    Args:
      codes: integer codes of any int dtype; only their low ``bits`` bits are kept, so signed
        and unsigned codes both work (1 bit: ``code > 0`` is kept, so sign codes ``{-1, +1}``
        and bits ``{0, 1}`` both work). Shape ``[..., n, ...]``.
      bits: 1, 2 or 4.
      axis: the axis to pack along.

    Returns:
      ``uint8`` array of shape ``[..., ceil(n * bits / 8), ...]``.
    """
    _check_bits(bits, "pack")
    k = 8 // bits
    axis = axis % codes.ndim
    n = codes.shape[axis]
    pad = (-n) % k
    if bits == 1:
        c = (codes > 0).astype(jnp.uint8)
    else:
        c = codes.astype(jnp.uint8) & jnp.uint8((1 << bits) - 1)
    if pad:
        widths = [(0, 0)] * c.ndim
        widths[axis] = (0, pad)
        c = jnp.pad(c, widths)
    c = c.reshape(c.shape[:axis] + ((n + pad) // k, k) + c.shape[axis + 1 :])
    shifts = (jnp.arange(k, dtype=jnp.uint8) * bits).reshape((k,) + (1,) * (c.ndim - axis - 2))
    # The shifted codes occupy disjoint bits, so their sum is their bitwise OR.
    return jnp.sum(c << shifts, axis=axis + 1, dtype=jnp.uint8)


def unpack(packed: jax.Array, bits: int, axis: int, n: int, *, signed: bool) -> jax.Array:
    """Inverse of :func:`pack`.

    Args:
      packed: ``uint8`` array from :func:`pack`.
      bits: 1, 2 or 4.
      axis: the packed axis.
      n: the original length of that axis.
      signed: sign-extend the codes (int formats; 1 bit: the sign code ``2 b - 1``) or not
        (codebook indices).

    Returns:
      ``int8`` codes with ``n`` elements along ``axis``.
    """
    _check_bits(bits, "unpack")
    k = 8 // bits
    axis = axis % packed.ndim
    p = jnp.expand_dims(packed.astype(jnp.uint8), axis + 1)
    shifts = (jnp.arange(k, dtype=jnp.uint8) * bits).reshape((k,) + (1,) * (packed.ndim - axis - 1))
    c = _extract(p, shifts, bits, signed)
    c = c.reshape(packed.shape[:axis] + (packed.shape[axis] * k,) + packed.shape[axis + 1 :])
    if c.shape[axis] != n:
        c = jax.lax.slice_in_dim(c, 0, n, axis=axis)
    return c


def unpack_plane(packed: jax.Array, bits: int, j: int, *, signed: bool) -> jax.Array:
    """Code ``j`` of every byte: elements ``k * i + j`` of the packed axis (``k = 8 // bits``).

    The ``k`` planes together are :func:`unpack`'s codes, de-interleaved; a product over the
    packed axis can use them without interleaving (``x . w == sum_j x[j::k] . plane_j``).

    Returns:
      ``int8`` codes with ``packed``'s shape.
    """
    if bits not in BITS or not 0 <= j < 8 // bits:
        raise ValueError(f"unpack_plane needs bits in {BITS} and 0 <= j < 8 // bits; got {bits}, {j}.")
    return _extract(packed.astype(jnp.uint8), jnp.uint8(bits * j), bits, signed)


def _extract(p: jax.Array, shift, bits: int, signed: bool) -> jax.Array:
    """``bits``-wide codes at ``shift`` of the bytes ``p``, as int8 (sign-extended if signed;
    a signed 1-bit field is the sign code ``2 b - 1``)."""
    c = ((p >> shift) & jnp.uint8((1 << bits) - 1)).astype(jnp.int8)
    if signed and bits == 1:
        return 2 * c - 1
    if signed:
        sign = jnp.int8(1 << (bits - 1))
        c = (c ^ sign) - sign
    return c
