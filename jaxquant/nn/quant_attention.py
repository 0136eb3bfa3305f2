"""The products inside a stock multi-head attention, quantized: ``q . k`` and ``attn . v``.

Both operands of these products are activations, so they are quantized dynamically with the
rule's activation spec (its ``lhs``: e.g. ``w8a8()`` gives int8 on both, int8 x int8 -> int32
where the backend has it): ``q`` with a scale per (batch, query, head), ``k`` per (batch, key,
head), the attention weights per (batch, head, query) and ``v`` per (batch, head, feature),
each over its contracted axis. A rule without an activation spec (weight-only) leaves them
float: they hold no weights.

* linen ``nn.MultiHeadDotProductAttention``: through its own hooks
  (``qk_attn_weights_einsum_cls`` / ``attn_weights_value_einsum_cls``) with Flax's
  ``dot_product_attention``;
* NNX ``nnx.MultiHeadAttention``: its ``attention_fn`` becomes :class:`NnxAttentionFn`, the
  computation of ``nnx.dot_product_attention`` (mask, causal mask, dropout, GQA) with the two
  products quantized.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxquant.core.dot_config import DotGeneralConfig
from jaxquant.core.dot_general import einsum
from jaxquant.nn.layer_quant import LayerPlan, Op, expand_ellipsis


def attention_plan(path: str, layer: str, config: DotGeneralConfig) -> LayerPlan | None:
    """The plan of an attention's two products, or None when ``config`` quantizes no
    activation (the products then stay float).

    Raises:
      ValueError: naming ``path`` for activation groups or a quantized backward.
    """
    act = config.lhs
    if act is None:
        return None
    if act.group_size is not None:
        raise ValueError(
            f"{path}: the rule quantizes activations in groups of {act.group_size}; the "
            f"attention products of this {layer} take a scale per row only. Use a config "
            "without lhs.group_size for this path."
        )
    if config.quantizes_backward:
        raise ValueError(
            f"{path}: quantized backward products are not supported for the attention products "
            f"of this {layer}. Use a forward-only config (w8a8()) for this path."
        )
    cfg = DotGeneralConfig(lhs=act, rhs=act, int_dot=config.int_dot)
    return LayerPlan(
        path=path,
        layer=layer,
        op=Op.ATTENTION,
        kernel_shape=(),
        contracting_axes=(),
        config=cfg,
        weight_name="",
    )


@dataclasses.dataclass(frozen=True)
class AttentionEinsum:
    """A quantized two-operand einsum with ``jnp.einsum``'s call style (``...`` allowed): what
    Flax's ``dot_product_attention`` calls for ``q . k`` and ``attn . v``."""

    plan: LayerPlan

    def __call__(
        self, subscripts, lhs, rhs, *, precision=None, preferred_element_type=None, **unused
    ):
        eq = expand_ellipsis(subscripts, jnp.ndim(lhs), jnp.ndim(rhs))
        return einsum(
            eq,
            lhs,
            rhs,
            config=self.plan.config,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )


@dataclasses.dataclass(frozen=True)
class NnxAttentionFn:
    """``nnx.dot_product_attention`` with the two products quantized per ``plan``.

    Args (of a call): as ``nnx.dot_product_attention``; ``query`` ``[..., q, heads, d]``,
    ``key`` / ``value`` ``[..., k, kv_heads, d]`` (``heads`` a multiple of ``kv_heads``).
    Returns ``[..., q, heads, d]``.
    """

    plan: LayerPlan

    def __call__(
        self,
        query,
        key,
        value,
        bias=None,
        mask=None,
        broadcast_dropout: bool = True,
        dropout_rng=None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype=None,
        precision=None,
        module=None,
        promote_dtype=None,
        is_causal: bool = False,
    ):
        if module is not None:
            raise ValueError(
                f"{self.plan.path}: sow_weights is not supported with quantized attention "
                "products; call the layer without sow_weights."
            )
        dtype = dtype or jnp.result_type(query.dtype, key.dtype, value.dtype)
        query, key, value = (jnp.asarray(a, dtype) for a in (query, key, value))
        prod = AttentionEinsum(self.plan)
        heads, kv_heads = query.shape[-2], key.shape[-2]
        if heads % kv_heads:
            raise ValueError(f"Query heads ({heads}) must be a multiple of key heads ({kv_heads}).")
        rep = heads // kv_heads
        # [..., q, kv_heads, rep, d] . [..., k, kv_heads, d] -> [..., kv_heads, rep, q, k]
        qg = query.reshape(*query.shape[:-2], kv_heads, rep, query.shape[-1])
        qg = qg / jnp.sqrt(query.shape[-1]).astype(dtype)
        w = prod("...qhgd,...khd->...hgqk", qg, key, precision=precision)
        w = w.reshape(*w.shape[:-4], heads, *w.shape[-2:])  # [..., heads, q, k]
        if bias is not None:
            w = w + bias
        masks = [] if mask is None else [jnp.asarray(mask, bool)]
        if is_causal:
            t, s = w.shape[-2:]
            masks.append(jnp.tril(jnp.ones((t, s), bool)))
        if masks:
            keep = masks[0]
            for m in masks[1:]:
                keep = jnp.logical_and(keep, m)
            w = jnp.where(keep, w, jnp.finfo(dtype).min)
        w = jax.nn.softmax(w).astype(dtype)
        if not deterministic and dropout_rate > 0.0:
            keep_prob = 1.0 - dropout_rate
            if broadcast_dropout:
                shape = (1,) * (key.ndim - 2) + w.shape[-2:]
            else:
                shape = w.shape
            keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
            w = w * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype))
        # [..., kv_heads, rep, q, k] . [..., k, kv_heads, d] -> [..., q, kv_heads, rep, d]
        wg = w.reshape(*w.shape[:-3], kv_heads, rep, *w.shape[-2:])
        out = prod("...hgqk,...khd->...qhgd", wg, value, precision=precision)
        return out.reshape(*out.shape[:-3], heads, out.shape[-1])
