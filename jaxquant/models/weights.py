"""Canonical weights -> the Transformer's Flax parameter tree, and `load_model`.

The canonical layout (flat names, float32, kernels ``[in, out]``) is what the
GGUF and safetensors loaders return. :func:`to_params` only renames and nests
it; no array is transposed or copied.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxquant.data.tokenizer import TextTokenizer
from jaxquant.models.fetch import resolve_model
from jaxquant.models.gguf_loader import gguf_metadata, load_gguf
from jaxquant.models.safetensors_loader import load_hf_folder

# Canonical layer suffix -> (module path in a block, param name).
_LAYER_PARAMS = {
    "attn_norm": (("attn_norm",), "scale"),
    "q": (("attn", "q_proj"), "kernel"),
    "k": (("attn", "k_proj"), "kernel"),
    "v": (("attn", "v_proj"), "kernel"),
    "o": (("attn", "o_proj"), "kernel"),
    "mlp_norm": (("mlp_norm",), "scale"),
    "gate": (("mlp", "gate_proj"), "kernel"),
    "up": (("mlp", "up_proj"), "kernel"),
    "down": (("mlp", "down_proj"), "kernel"),
}


def canonical_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The name and shape of every canonical weight a config implies.

    Args:
      config: A config dict as the loaders return it.

    Returns:
      Canonical name -> shape; ``lm_head`` only when ``tie_embeddings`` is false.
    """
    d, v, f = config["d_model"], config["vocab_size"], config["ffn_dim"]
    q_dim = config["n_heads"] * config["head_dim"]
    kv_dim = config["n_kv_heads"] * config["head_dim"]
    layer = {
        "attn_norm": (d,),
        "q": (d, q_dim),
        "k": (d, kv_dim),
        "v": (d, kv_dim),
        "o": (q_dim, d),
        "mlp_norm": (d,),
        "gate": (d, f),
        "up": (d, f),
        "down": (f, d),
    }
    shapes = {"embed": (v, d), "final_norm": (d,)}
    for i in range(config["n_layers"]):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    if not config["tie_embeddings"]:
        shapes["lm_head"] = (d, v)
    return shapes


def check_canonical(weights: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    """Raises a ValueError unless ``weights`` match ``config`` exactly.

    Args:
      weights: Canonical weights.
      config: Their config dict.
    """
    expected = canonical_shapes(config)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ValueError(
            f"Weights do not match the config: missing {missing[:6]}, unexpected "
            f"{extra[:6]}. Check n_layers and tie_embeddings in the config."
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(
                f"Weight {name} has shape {tuple(weights[name].shape)}, but the config "
                f"implies {shape}. Kernels must be [in, out]."
            )


def to_params(weights: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, Any]:
    """Nests canonical weights into the Transformer's Flax parameter tree.

    Args:
      weights: Canonical weights (see :func:`jaxquant.models.gguf_loader.load_gguf`).
      config: Their config dict.

    Returns:
      Plain nested dicts of the same float32 numpy arrays::

        {"embed": {"embedding": [V, D]},
         "block_{i}": {"attn_norm": {"scale": [D]},
                       "attn": {"q_proj": {"kernel": [D, H*hd]}, "k_proj": ...,
                                "v_proj": ..., "o_proj": {"kernel": [H*hd, D]}},
                       "mlp_norm": {"scale": [D]},
                       "mlp": {"gate_proj": {"kernel": [D, F]}, "up_proj": ...,
                               "down_proj": {"kernel": [F, D]}}},
         "final_norm": {"scale": [D]},
         "lm_head": {"kernel": [D, V]}}  # only when not tied

    Raises:
      ValueError: If the weights do not match the config.

    Example:
      >>> params = to_params(*load_gguf(path))  # doctest: +SKIP
      >>> params["block_0"]["attn"]["q_proj"]["kernel"].shape  # doctest: +SKIP
      (576, 576)
    """
    check_canonical(weights, config)
    params: dict[str, Any] = {
        "embed": {"embedding": weights["embed"]},
        "final_norm": {"scale": weights["final_norm"]},
    }
    for i in range(config["n_layers"]):
        block: dict[str, Any] = {}
        for name, (path, leaf) in _LAYER_PARAMS.items():
            node = block
            for key in path:
                node = node.setdefault(key, {})
            node[leaf] = weights[f"layers.{i}.{name}"]
        params[f"block_{i}"] = block
    if not config["tie_embeddings"]:
        params["lm_head"] = {"kernel": weights["lm_head"]}
    return params


def load_model(
    name_or_path: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, Any], TextTokenizer]:
    """Loads parameters, config and tokenizer of a model.

    Args:
      name_or_path: A known name (``"smollm2-135m"``), a ``.gguf`` file or a
        Hugging Face folder (see :func:`jaxquant.models.fetch.resolve_model`).

    Returns:
      ``(params, config, tokenizer)``: the Flax parameter tree of
      :func:`to_params`, the config dict, and a
      :class:`jaxquant.data.tokenizer.TextTokenizer`.

    Example:
      >>> params, config, tok = load_model("smollm2-135m")  # doctest: +SKIP
      >>> config["n_layers"], tok.encode("Hello world")  # doctest: +SKIP
      (30, [19556, 905])
    """
    path = resolve_model(name_or_path)
    if path.suffix == ".gguf":
        weights, config = load_gguf(path)
    else:
        weights, config = load_hf_folder(path)
    return to_params(weights, config), config, load_tokenizer(path)


def load_tokenizer(name_or_path: str | os.PathLike) -> TextTokenizer:
    """The tokenizer of a model name, ``.gguf`` file or Hugging Face folder.

    Args:
      name_or_path: Anything :func:`jaxquant.models.fetch.resolve_model` accepts.

    Returns:
      A :class:`~jaxquant.data.tokenizer.TextTokenizer`.
    """
    path = resolve_model(name_or_path)
    if path.suffix == ".gguf":
        return TextTokenizer.from_gguf(gguf_metadata(path, "tokenizer."), str(path))
    return TextTokenizer.from_folder(path)
