"""Models by name: ``tiny`` (random, for tests), ``smollm2-135m``, a ``.gguf`` or an HF folder."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.data.tokenizer import TextTokenizer, byte_tokenizer
from jaxquant.models.weights import load_model
from jaxquant.nn.config import TransformerConfig
from jaxquant.nn.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A float model ready to evaluate or quantize.

    Attributes:
      name: what the user asked for.
      cfg: its :class:`TransformerConfig`.
      params: float params (the Transformer's tree).
      tokenizer: its tokenizer.
    """

    name: str
    cfg: TransformerConfig
    params: Any
    tokenizer: TextTokenizer


def load(name: str, *, seed: int = 0, max_seq_len: int | None = None) -> LoadedModel:
    """Loads a model by name or path.

    Args:
      name: ``"tiny"``, ``"smollm2-135m"``, a ``.gguf`` path or a Hugging Face folder.
      seed: init seed of ``tiny``.
      max_seq_len: override the context length (e.g. cap SmolLM2's 8192 to 2048).
    """
    if name == "tiny":
        cfg = TransformerConfig.tiny()
        if max_seq_len:
            cfg = dataclasses.replace(cfg, max_seq_len=max_seq_len)
        params = Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))
        return LoadedModel(name, cfg, params["params"], byte_tokenizer())
    params, config, tokenizer = load_model(name)
    cfg = TransformerConfig.from_dict(config)
    if max_seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=max_seq_len)
    params = jax.tree.map(jnp.asarray, params)
    return LoadedModel(name, cfg, params, tokenizer)
