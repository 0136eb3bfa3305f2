"""`TransformerConfig`: the shape of a decoder-only LLaMA model and how it is quantized."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jaxquant.core.dot_config import DotGeneralConfig
from jaxquant.core.qtypes import canonical_qtype
from jaxquant.core.serialization import fields_to_dict
from jaxquant.nn.rules import QuantRule

ROPE_LAYOUTS = ("adjacent", "half")
KV_QTYPES = (None, "int8", "int4")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """A decoder-only LLaMA: RMSNorm, RoPE, GQA attention, SwiGLU MLP. Frozen, ``kw_only``.

    Attributes:
      vocab_size: ``V``.
      d_model: ``D``.
      n_layers: number of blocks.
      n_heads: query heads ``H``.
      n_kv_heads: key/value heads ``KV`` (divides ``H``; ``H // KV`` queries share one).
      head_dim: ``hd`` (even, for RoPE).
      ffn_dim: SwiGLU hidden size ``F``.
      rope_theta: RoPE base.
      rms_eps: RMSNorm epsilon.
      tie_embeddings: use the embedding as the output head (no ``lm_head`` param).
      rope_layout: ``"adjacent"`` rotates pairs ``(x[2i], x[2i+1])`` (llama.cpp / GGUF),
        ``"half"`` rotates ``(x[i], x[i + hd/2])`` (Hugging Face ``rotate_half``).
      max_seq_len: longest sequence (positions) the model accepts.
      dtype: compute dtype of activations; logits are always float32.
      param_dtype: dtype of the float params ``init`` creates.
      quant_rules: :class:`QuantRule` s matched against module paths such as
        ``"block_3/attn/q_proj"``, ``"block_0/mlp/down_proj"``, ``"lm_head"`` and ``"embed"``
        (the tied head, and the table the lookup reads). First match wins; no match is float.
      attn_qk_config: :class:`DotGeneralConfig` of the score product ``Q K^T`` (both operands
        are activations, quantized per token and head over ``hd``: causal), or None for float.
      attn_pv_config: :class:`DotGeneralConfig` of ``P V``, or None for float. Its contraction
        runs over the key tokens, so a quantized ``V`` (``rhs``) gets one scale per channel over
        *all* tokens: in a full forward, later tokens then influence earlier outputs through that
        scale, and decoding no longer equals the full forward. Quantizing only the
        probabilities (``DotGeneralConfig(lhs=QuantSpec(qtype="int8"))``) stays causal.
      kv_cache_qtype: KV-cache storage for decoding: None (the compute dtype), ``"int8"`` or
        ``"int4"`` (packed), with a scale per (batch, token, kv head).
      init_std: stddev of the random normal init of embeddings and kernels.

    Example:
      >>> cfg = TransformerConfig.tiny().with_quantization(w8a8())
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    rope_layout: str
    max_seq_len: int
    dtype: str = "float32"
    param_dtype: str = "float32"
    quant_rules: tuple[QuantRule, ...] = ()
    attn_qk_config: DotGeneralConfig | None = None
    attn_pv_config: DotGeneralConfig | None = None
    kv_cache_qtype: str | None = None
    init_std: float = 0.02

    def __post_init__(self):
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "ffn_dim",
            "max_seq_len",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs n_heads to be a multiple of n_kv_heads."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}.")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(
                f"Unknown rope_layout {self.rope_layout!r}; use 'adjacent' (llama.cpp/GGUF "
                "weights) or 'half' (Hugging Face weights)."
            )
        if not float(self.rope_theta) > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}.")
        if not float(self.rms_eps) > 0:
            raise ValueError(f"rms_eps must be > 0, got {self.rms_eps}.")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}.")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}.")
        rules = self.quant_rules
        if isinstance(rules, QuantRule):
            rules = (rules,)
        if not all(isinstance(r, QuantRule) for r in rules):
            raise ValueError("quant_rules must be a sequence of QuantRule.")
        object.__setattr__(self, "quant_rules", tuple(rules))
        for name in ("attn_qk_config", "attn_pv_config"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, DotGeneralConfig):
                raise ValueError(f"{name} must be a DotGeneralConfig or None, got {v!r}.")
        if self.kv_cache_qtype is not None:
            kv = canonical_qtype(self.kv_cache_qtype)
            if kv not in KV_QTYPES:
                raise ValueError(
                    f"kv_cache_qtype must be None, 'int8' or 'int4', got {self.kv_cache_qtype!r}."
                )
            object.__setattr__(self, "kv_cache_qtype", kv)
        if not float(self.init_std) > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}.")

    # --- derived ---------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    # --- construction and serialization -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field, the rules and attention configs included (as dicts).

        ``TransformerConfig.from_dict(cfg.to_dict()) == cfg``.
        """
        return fields_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides) -> TransformerConfig:
        """From :meth:`to_dict`'s dict or the loaders' config dict (unknown keys raise, so typos
        don't pass silently). ``quant_rules`` and the attention configs may be given as dicts
        (as :meth:`to_dict` writes them) or as objects."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown TransformerConfig keys {unknown}; known: {sorted(names)}.")
        kw = {**dict(d), **overrides}
        if "quant_rules" in kw and not isinstance(kw["quant_rules"], QuantRule):
            kw["quant_rules"] = tuple(
                QuantRule.from_dict(r) if isinstance(r, Mapping) else r for r in kw["quant_rules"]
            )
        for name in ("attn_qk_config", "attn_pv_config"):
            if isinstance(kw.get(name), Mapping):
                kw[name] = DotGeneralConfig.from_dict(kw[name])
        return cls(**kw)

    @classmethod
    def tiny(cls, **overrides) -> TransformerConfig:
        """A random-init test model: byte vocab 256, 2 layers, d=64, 4 heads, 2 KV heads."""
        base = dict(
            vocab_size=256,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=16,
            ffn_dim=128,
            rope_theta=10000.0,
            rms_eps=1e-5,
            tie_embeddings=True,
            rope_layout="adjacent",
            max_seq_len=128,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def smollm2_135m(cls, **overrides) -> TransformerConfig:
        """SmolLM2-135M's shapes (its GGUF weights use the adjacent RoPE layout)."""
        base = dict(
            vocab_size=49152,
            d_model=576,
            n_layers=30,
            n_heads=9,
            n_kv_heads=3,
            head_dim=64,
            ffn_dim=1536,
            rope_theta=1e5,
            rms_eps=1e-5,
            tie_embeddings=True,
            rope_layout="adjacent",
            max_seq_len=2048,
        )
        return cls(**{**base, **overrides})

    def with_quantization(
        self,
        config: DotGeneralConfig | None,
        *,
        head: DotGeneralConfig | None = None,
        static_activation: str | None = None,
    ) -> TransformerConfig:
        """Every block projection quantized with ``config``; the head (``embed`` when tied,
        ``lm_head`` otherwise) with ``head`` (None keeps it float). Replaces ``quant_rules``."""
        rules = [
            QuantRule(
                r"(^|/)block_\d+/(attn|mlp)/",
                config,
                static_activation=static_activation if config is not None else None,
            )
        ]
        rules.append(QuantRule(r"(^|/)(embed|lm_head)$", head))
        return dataclasses.replace(self, quant_rules=tuple(rules))
