"""A decoder-only LLaMA-style `Transformer` whose every projection is quantizable by rules.

Param tree (what the GGUF / safetensors importers write; in SERVE mode the quantized kernels
are :class:`~jaxquant.core.QArray` s)::

    {"embed": {"embedding": [V, D]},
     "block_{i}": {"attn_norm": {"scale": [D]},
                   "attn": {"q_proj": {"kernel": [D, H*hd]}, "k_proj": {"kernel": [D, KV*hd]},
                            "v_proj": {"kernel": [D, KV*hd]}, "o_proj": {"kernel": [H*hd, D]}},
                   "mlp_norm": {"scale": [D]},
                   "mlp": {"gate_proj": {"kernel": [D, F]}, "up_proj": {"kernel": [D, F]},
                           "down_proj": {"kernel": [F, D]}}},
     "final_norm": {"scale": [D]},
     "lm_head": {"kernel": [D, V]}}   # only when not tied

Train -> convert -> serve::

    model = Transformer(cfg.with_quantization(w8a8()))           # TRAIN mode: QAT
    params = model.init(key, tokens)["params"]
    serve_params = jaxquant.nn.convert(model, params)            # QArray kernels, no float copy
    logits = Transformer(model.cfg, mode=QuantMode.SERVE).apply({"params": serve_params}, tokens)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.nn import kv_cache
from jaxquant.nn.attention import Attention, qdense
from jaxquant.nn.block_stack import BlockStack
from jaxquant.nn.config import TransformerConfig
from jaxquant.nn.linear import QEmbed
from jaxquant.nn.modes import QuantMode
from jaxquant.nn.params import param_bytes
from jaxquant.nn.rules import QuantRule, config_for, module_path
from jaxquant.nn.sites import Site, SiteTable


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * scale``, computed in float32; param ``scale [D]``."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    cfg: TransformerConfig
    mode: QuantMode = QuantMode.TRAIN

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        g = qdense(self, "gate_proj", cfg.ffn_dim, cfg, self.mode)(x)
        u = qdense(self, "up_proj", cfg.ffn_dim, cfg, self.mode)(x)
        return qdense(self, "down_proj", cfg.d_model, cfg, self.mode)(nn.silu(g) * u)


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    cfg: TransformerConfig
    mode: QuantMode = QuantMode.TRAIN

    @nn.compact
    def __call__(self, x, positions, cache=None, start=None):
        cfg = self.cfg
        norm = lambda name: RMSNorm(
            cfg.rms_eps, cfg.compute_dtype, jnp.dtype(cfg.param_dtype), name=name
        )
        h, cache = Attention(cfg, self.mode, name="attn")(
            norm("attn_norm")(x), positions, cache, start
        )
        x = x + h
        x = x + MLP(cfg, self.mode, name="mlp")(norm("mlp_norm")(x))
        return x, cache


class Transformer(nn.Module):
    """Decoder-only LLaMA (RMSNorm, RoPE, GQA, SwiGLU, tied or untied head, causal mask).

    Attributes:
      cfg: the :class:`TransformerConfig` (shapes, quantization rules, KV-cache type).
      mode: :class:`QuantMode`; every quantized layer follows it.

    Example:
      >>> model = Transformer(TransformerConfig.tiny())
      >>> tokens = jnp.zeros((2, 8), jnp.int32)
      >>> params = model.init(jax.random.key(0), tokens)["params"]
      >>> model.apply({"params": params}, tokens).shape
      (2, 8, 256)
    """

    cfg: TransformerConfig
    mode: QuantMode = QuantMode.TRAIN

    def example_inputs(self):
        """A minimal input for tracing (``convert`` uses it)."""
        return (jnp.zeros((1, 1), jnp.int32),)

    @nn.compact
    def __call__(self, tokens, *, cache: kv_cache.KVCache | None = None):
        """Logits of the next token.

        Args:
          tokens: int ``[B, S]``.
          cache: a :class:`~jaxquant.nn.kv_cache.KVCache` (from ``init_kv_cache``) holding the
            keys / values of the ``cache.length`` tokens before these, or None.

        Returns:
          ``logits [B, S, V]`` float32; with a cache, ``(logits, new_cache)``.
        """
        cfg = self.cfg
        b, s = tokens.shape
        if s > cfg.max_seq_len:
            raise ValueError(f"sequence length {s} exceeds max_seq_len={cfg.max_seq_len}.")
        if cache is not None and len(cache.layers) != cfg.n_layers:
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {cfg.n_layers}.")
        embed_cfg, embed_static = config_for(cfg.quant_rules, module_path(self, "embed"))
        if embed_static is not None:
            raise ValueError(
                "static_activation is not supported for the embedding (tied head); give the "
                "rule matching 'embed' static_activation=None."
            )
        embed = QEmbed(
            cfg.vocab_size,
            cfg.d_model,
            config=embed_cfg,
            mode=self.mode,
            dtype=cfg.compute_dtype,
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nn.initializers.normal(stddev=cfg.init_std),
            name="embed",
        )
        x = embed(tokens)
        start = cache.length if cache is not None else jnp.zeros((), jnp.int32)
        positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
        layers = []
        for i in range(cfg.n_layers):
            lc = cache.layers[i] if cache is not None else None
            x, lc = Block(cfg, self.mode, name=f"block_{i}")(x, positions, lc, start)
            layers.append(lc)
        x = RMSNorm(cfg.rms_eps, cfg.compute_dtype, jnp.dtype(cfg.param_dtype), name="final_norm")(
            x
        )
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = qdense(self, "lm_head", cfg.vocab_size, cfg, self.mode)(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, kv_cache.KVCache(tuple(layers), start + s)


def serving_params_shape(cfg: TransformerConfig):
    """The abstract serving param tree of ``cfg`` (``jax.eval_shape``; nothing is computed)."""
    model = Transformer(cfg, mode=QuantMode.SERVE)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *model.example_inputs())["params"])


def serving_param_bytes(cfg: TransformerConfig) -> int:
    """Bytes of the serving params of ``cfg`` under its ``quant_rules`` (QArray codes + scales,
    float leaves at ``cfg.param_dtype``), from abstract shapes only.

    Example:
      >>> serving_param_bytes(TransformerConfig.smollm2_135m().with_quantization(w8a8()))  # doctest: +SKIP
    """
    return param_bytes(serving_params_shape(cfg))


def _mlp_output(kernels, x, block):
    """What ``gate_proj`` / ``up_proj`` feed: the MLP's output ``[n, D]`` (AWQ's search target)."""
    gate, up = kernels
    return (jax.nn.silu(x @ gate) * (x @ up)) @ block["mlp/down_proj/kernel"]


def block_sites(cfg: TransformerConfig) -> SiteTable:
    """The input sites of a :class:`Block` (what PTQ calibrates on and folds scales into).

    ==========  ============================  ===========================================
    site        linears                       a scale of the input folds into
    ==========  ============================  ===========================================
    attn_in     q_proj, k_proj, v_proj        ``attn_norm``
    o_in        o_proj                        ``v_proj``'s output columns (not under GQA)
    mlp_in      gate_proj, up_proj            ``mlp_norm``
    down_in     down_proj                     ``up_proj``'s output columns
    ==========  ============================  ===========================================

    Under GQA, ``v_proj``'s ``KV * hd`` outputs are shared by several heads and are not
    ``o_proj``'s ``H * hd`` inputs one to one, so ``o_in`` has nothing to fold into.
    """
    return SiteTable(sites=(
        Site(name="attn_in", linears=("attn/q_proj", "attn/k_proj", "attn/v_proj"),
             d_in=cfg.d_model, fold_into="attn_norm/scale",
             bilinear=("attn/q_proj", "attn/k_proj")),
        Site(name="o_in", linears=("attn/o_proj",), d_in=cfg.q_dim,
             fold_into="attn/v_proj/kernel" if cfg.n_heads == cfg.n_kv_heads else None),
        Site(name="mlp_in", linears=("mlp/gate_proj", "mlp/up_proj"), d_in=cfg.d_model,
             fold_into="mlp_norm/scale", output=_mlp_output),
        Site(name="down_in", linears=("mlp/down_proj",), d_in=cfg.ffn_dim,
             fold_into="mlp/up_proj/kernel"),
    ))


@dataclasses.dataclass(frozen=True)
class TransformerStack(BlockStack):
    """The :class:`Transformer` as block-by-block PTQ runs it (:func:`jaxquant.ptq.quantize_blocks`):
    the embedding lookup, then ``block_0 .. block_{n_layers-1}`` taking ``(h, positions)``.

    Attributes:
      cfg: the float model's config.
    """

    cfg: TransformerConfig

    @property
    def block_keys(self) -> tuple[str, ...]:
        return tuple(f"block_{i}" for i in range(self.cfg.n_layers))

    @property
    def sites(self) -> SiteTable:
        return block_sites(self.cfg)

    @property
    def block_prefix(self) -> str:
        return r"(^|/)block_\d+/"

    def block_inputs(self, params: Mapping, tokens: jax.Array) -> tuple[jax.Array, tuple]:
        """The float embedding rows ``[n, length, D]`` and positions ``0 .. length-1``."""
        n, length = tokens.shape
        h = jnp.asarray(params["embed"]["embedding"])[tokens].astype(self.cfg.compute_dtype)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
        return h, (positions,)

    def block(self, rules: Sequence[QuantRule] | None, mode: QuantMode) -> Block:
        cfg = self.cfg if rules is None else dataclasses.replace(self.cfg,
                                                                 quant_rules=tuple(rules))
        return Block(cfg, mode)

    def serving(self, rules: Sequence[QuantRule] | None) -> TransformerConfig:
        """``cfg`` with ``rules`` (embeddings and head stay float); None: ``cfg``."""
        return self.cfg if rules is None else dataclasses.replace(self.cfg,
                                                                  quant_rules=tuple(rules))
