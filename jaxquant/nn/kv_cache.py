"""Key/value cache for decoding: float, int8, or int4 (two codes per byte).

Lingo: ``B`` batch, ``T`` cache capacity (tokens), ``KV`` key/value heads, ``hd`` head dim.
Keys and values ``[B, S, KV, hd]`` are quantized with one scale per ``(b, s, kv)`` shared over
``hd`` (symmetric absmax), so each cached element is within half a step,
``max_d |x[b, s, kv, d]| / (2 * qmax)``, of the float value (``qmax`` 127 for int8, 7 for int4).

The cache is a pytree (:class:`KVCache`) passed into and returned from the model; it is
updated with ``lax.dynamic_update_slice`` at ``length``, so one jitted step serves every position.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core import QArray, QuantSpec, quantize
from jaxquant.core.qtypes import get_qtype
from jaxquant.nn.config import TransformerConfig
from jaxquant.nn.params import param_bytes


class LayerKVCache(NamedTuple):
    """One layer's cache.

    Attributes:
      k, v: float ``[B, T, KV, hd]`` (compute dtype), int8 codes ``[B, T, KV, hd]``, or packed
        int4 codes ``uint8 [B, T, KV, hd / 2]``.
      k_scale, v_scale: float32 ``[B, T, KV, 1]`` for quantized caches, else None.
    """

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None


class KVCache(NamedTuple):
    """The whole model's cache: one :class:`LayerKVCache` per block and the filled length."""

    layers: tuple[LayerKVCache, ...]
    length: jax.Array  # int32 [], tokens already in the cache

    @property
    def capacity(self) -> int:
        return self.layers[0].k.shape[1]


def _spec(qtype: str) -> QuantSpec:
    return QuantSpec(qtype=qtype, channel_axes=(0, 1, 2))


def init_kv_cache(
    cfg: TransformerConfig, batch: int, max_len: int | None = None, *, qtype: str | None = "config"
) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens.

    Args:
      cfg: the model config (layers, heads, dtype).
      batch: ``B``.
      max_len: capacity ``T`` (default ``cfg.max_seq_len``).
      qtype: None, ``"int8"`` or ``"int4"``; default ``cfg.kv_cache_qtype``.

    Example:
      >>> cache = init_kv_cache(TransformerConfig.tiny(), batch=2, max_len=64, qtype="int8")
    """
    if isinstance(qtype, str) and qtype == "config":
        qtype = cfg.kv_cache_qtype
    max_len = cfg.max_seq_len if max_len is None else int(max_len)
    if not 1 <= max_len <= cfg.max_seq_len:
        raise ValueError(
            f"max_len must be in [1, {cfg.max_seq_len}] (cfg.max_seq_len), got {max_len}."
        )
    shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    # Every buffer is its own array, so the cache can be donated (one buffer donated twice fails).
    if qtype is None:
        new_layer = lambda: LayerKVCache(*(jnp.zeros(shape, cfg.compute_dtype) for _ in "kv"))
    else:
        qt = get_qtype(qtype)
        if qt.name not in ("int8", "int4"):
            raise ValueError(f"KV cache qtype must be None, 'int8' or 'int4', got {qtype!r}.")
        cshape = shape[:3] + (shape[3] * qt.storage_bits // 8,)
        codes = lambda: jnp.zeros(cshape, jnp.uint8 if qt.packed else jnp.int8)
        scale = lambda: jnp.ones(shape[:3] + (1,), jnp.float32)
        new_layer = lambda: LayerKVCache(codes(), codes(), scale(), scale())
    return KVCache(tuple(new_layer() for _ in range(cfg.n_layers)), jnp.zeros((), jnp.int32))


def cache_qtype(layer: LayerKVCache) -> str | None:
    """``None`` (float), ``"int8"`` or ``"int4"``, from the stored dtypes."""
    if layer.k_scale is None:
        return None
    return "int4" if layer.k.dtype == jnp.uint8 else "int8"


def quantize_kv(x: jax.Array, qtype: str) -> tuple[jax.Array, jax.Array]:
    """``x [B, S, KV, hd]`` -> ``(codes, scale [B, S, KV, 1])`` (int4 codes packed along hd)."""
    q = quantize(x.astype(jnp.float32), _spec(qtype))
    return q.qvalue, q.scale


def dequantize_kv(
    codes: jax.Array, scale: jax.Array, qtype: str, head_dim: int, dtype
) -> jax.Array:
    """Inverse of :func:`quantize_kv`: ``[B, T, KV, hd]`` in ``dtype``."""
    packed = get_qtype(qtype).packed
    q = QArray(
        qvalue=codes,
        scale=scale,
        zero_point=None,
        qtype=qtype,
        shape=tuple(codes.shape[:3]) + (head_dim,),
        dtype=np.dtype(dtype),
        channel_axes=(0, 1, 2),
        pack_axis=3 if packed else None,
    )
    return q.dequantize(dtype)


def update_layer(layer: LayerKVCache, k: jax.Array, v: jax.Array, start: jax.Array) -> LayerKVCache:
    """Writes ``k, v [B, S, KV, hd]`` at token ``start`` (the caller keeps ``start + S <= T``)."""
    qtype = cache_qtype(layer)
    at = (0, start, 0, 0)
    put = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), at)
    if qtype is None:
        return LayerKVCache(put(layer.k, k), put(layer.v, v))
    kc, ks = quantize_kv(k, qtype)
    vc, vs = quantize_kv(v, qtype)
    return LayerKVCache(
        put(layer.k, kc), put(layer.v, vc), put(layer.k_scale, ks), put(layer.v_scale, vs)
    )


def read_layer(layer: LayerKVCache, head_dim: int, dtype) -> tuple[jax.Array, jax.Array]:
    """The cached keys and values ``[B, T, KV, hd]`` in ``dtype`` (zeros past the length)."""
    qtype = cache_qtype(layer)
    if qtype is None:
        return layer.k.astype(dtype), layer.v.astype(dtype)
    return (
        dequantize_kv(layer.k, layer.k_scale, qtype, head_dim, dtype),
        dequantize_kv(layer.v, layer.v_scale, qtype, head_dim, dtype),
    )


def kv_cache_bytes(
    cfg: TransformerConfig, batch: int, max_len: int | None = None, *, qtype: str | None = "config"
) -> int:
    """Bytes of a full cache (codes plus scales), from ``jax.eval_shape`` (nothing allocated).

    Example:
      >>> kv_cache_bytes(TransformerConfig.smollm2_135m(), 1, 2048, qtype=None)
      94371840
    """
    shapes = jax.eval_shape(lambda: init_kv_cache(cfg, batch, max_len, qtype=qtype))
    return param_bytes(shapes.layers)
