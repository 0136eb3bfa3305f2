"""Grouped-query causal self-attention with RoPE, quantizable projections and KV cache.

Lingo: ``B`` batch, ``S`` query tokens, ``T`` key tokens, ``H`` query heads, ``KV`` key/value
heads, ``G = H // KV`` queries per KV head, ``hd`` head dim. Query head ``h`` reads KV head
``h // G`` (Hugging Face's ``repeat_kv`` order).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.core.dot_config import DotGeneralConfig
from jaxquant.core.dot_general import einsum
from jaxquant.nn import kv_cache
from jaxquant.nn.config import TransformerConfig
from jaxquant.nn.linear import QDense
from jaxquant.nn.modes import QuantMode
from jaxquant.nn.rope import apply_rope
from jaxquant.nn.rules import config_for, learned_scale_for, module_path


def qdense(
    parent: nn.Module, name: str, features: int, cfg: TransformerConfig, mode: QuantMode
) -> QDense:
    """A bias-free :class:`QDense` child named ``name``, quantized by ``cfg.quant_rules``."""
    path = module_path(parent, name)
    config, static = config_for(cfg.quant_rules, path)
    return QDense(
        features,
        config=config,
        static_activation=static,
        learned_scale=learned_scale_for(cfg.quant_rules, path),
        mode=mode,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.initializers.normal(stddev=cfg.init_std),
        name=name,
    )


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    qk_config: DotGeneralConfig | None = None,
    pv_config: DotGeneralConfig | None = None,
) -> jax.Array:
    """Causal GQA attention ``softmax(q k^T / sqrt(hd)) v``.

    Args:
      q: ``[B, S, H, hd]`` queries.
      k, v: ``[B, T, KV, hd]`` keys and values.
      q_pos: ``[B, S]`` positions of the queries; ``k_pos``: ``[B, T]`` of the keys. Key ``t`` is
        visible to query ``s`` iff ``k_pos[t] <= q_pos[s]``.
      qk_config, pv_config: quantization of the products ``q k^T`` and ``p v``, or None.

    Returns:
      ``[B, S, H, hd]`` in ``q``'s dtype.
    """
    b, s, h, hd = q.shape
    nkv = k.shape[2]
    qg = q.reshape(b, s, nkv, h // nkv, hd)
    scores = einsum("bskgd,btkd->bkgst", qg, k, config=qk_config).astype(jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd))
    mask = k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = einsum("bkgst,btkd->bskgd", probs, v, config=pv_config)
    return out.reshape(b, s, h, hd).astype(q.dtype)


class Attention(nn.Module):
    """``x [B, S, D] -> [B, S, D]``; params ``q_proj, k_proj, v_proj, o_proj`` (kernels only).

    Keys and values after RoPE go through ``self.perturb("k" / "v")`` (a no-op unless a
    ``perturbations`` collection is passed to ``apply``), for sensitivity analysis.
    """

    cfg: TransformerConfig
    mode: QuantMode = QuantMode.TRAIN

    @nn.compact
    def __call__(self, x, positions, cache: kv_cache.LayerKVCache | None = None, start=None):
        """Args: ``x [B, S, D]``, ``positions [B, S]``; with ``cache``, ``start`` (int32 ``[]``)
        is where the new keys go. Returns ``(y, new_cache)`` (``new_cache`` None without cache)."""
        cfg = self.cfg
        b, s, _ = x.shape
        hd = cfg.head_dim
        q = qdense(self, "q_proj", cfg.q_dim, cfg, self.mode)(x).reshape(b, s, cfg.n_heads, hd)
        k = qdense(self, "k_proj", cfg.kv_dim, cfg, self.mode)(x).reshape(b, s, cfg.n_kv_heads, hd)
        v = qdense(self, "v_proj", cfg.kv_dim, cfg, self.mode)(x).reshape(b, s, cfg.n_kv_heads, hd)
        q = apply_rope(q, positions, cfg.rope_theta, cfg.rope_layout)
        k = apply_rope(k, positions, cfg.rope_theta, cfg.rope_layout)
        if not self.is_initializing():
            k = self.perturb("k", k)
            v = self.perturb("v", v)
        if cache is not None:
            cache = kv_cache.update_layer(cache, k, v, start)
            k, v = kv_cache.read_layer(cache, hd, q.dtype)
            k_pos = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (b, k.shape[1]))
        else:
            k_pos = positions
        calib = self.mode == QuantMode.CALIBRATE
        qk_cfg = None if calib else cfg.attn_qk_config
        pv_cfg = None if calib else cfg.attn_pv_config
        out = attend(q, k, v, positions, k_pos, qk_cfg, pv_cfg).reshape(b, s, cfg.q_dim)
        return qdense(self, "o_proj", cfg.d_model, cfg, self.mode)(out), cache
