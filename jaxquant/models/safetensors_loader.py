"""Read a Hugging Face LLaMA folder (``config.json`` + ``*.safetensors``).

Hugging Face stores ``nn.Linear`` weights ``[out, in]``; the canonical layout
wants kernels ``[in, out]``, so every projection is transposed. Q/K rows are in
Hugging Face's "rotate_half" order, hence ``rope_layout="half"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from jaxquant.errors import CorruptModelFileError, JaxquantError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")

# HF suffix after "model.layers.{i}." -> (canonical suffix, transpose?).
_LAYER_TENSORS = {
    "input_layernorm.weight": ("attn_norm", False),
    "self_attn.q_proj.weight": ("q", True),
    "self_attn.k_proj.weight": ("k", True),
    "self_attn.v_proj.weight": ("v", True),
    "self_attn.o_proj.weight": ("o", True),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "mlp.gate_proj.weight": ("gate", True),
    "mlp.up_proj.weight": ("up", True),
    "mlp.down_proj.weight": ("down", True),
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": ("embed", False),
    "model.norm.weight": ("final_norm", False),
    "lm_head.weight": ("lm_head", True),
}
# Buffers some checkpoints still carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_folder(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Loads a Hugging Face LLaMA checkpoint into the canonical layout.

    Args:
      folder: A folder with ``config.json`` and one or more ``*.safetensors``
        shards (bf16, f16 or f32).

    Returns:
      ``(weights, config)`` exactly as :func:`jaxquant.models.gguf_loader.load_gguf`
      returns them (float32, kernels ``[in, out]``), but with
      ``rope_layout="half"``. ``lm_head`` is present only when
      ``tie_word_embeddings`` is false.

    Raises:
      ValueError: If the folder is not a plain LLaMA checkpoint.

    Example:
      >>> weights, config = load_hf_folder("SmolLM2-135M")  # doctest: +SKIP
      >>> weights["layers.0.k"].shape  # doctest: +SKIP
      (576, 192)
    """
    root = Path(folder)
    config = hf_config(root)
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"No *.safetensors files in {root}; download the model weights there.")
    weights = {}
    for shard in shards:
        try:
            tensors = load_file(os.fspath(shard))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, MemoryError...
            gist = (str(e).strip().splitlines() or [""])[0][:300]
            raise CorruptModelFileError(
                f"{shard}: not a readable safetensors file ({type(e).__name__}: {gist}); it is "
                "truncated or corrupt. Download it again."
            ) from e
        for hf_name, array in tensors.items():
            if hf_name.endswith(_IGNORED_SUFFIXES):
                continue
            name, transpose = _canonical_name(hf_name, root)
            weights[name] = np.array(array.T if transpose else array, dtype=np.float32, order="C")
    if config["tie_embeddings"]:
        weights.pop("lm_head", None)  # Some tied checkpoints still store a copy.
    elif "lm_head" not in weights:
        raise ValueError(
            f"{root}: tie_word_embeddings is false but lm_head.weight is missing; set "
            "tie_word_embeddings to true in config.json if the output is tied."
        )
    return weights, config


def hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The canonical config dict from a Hugging Face ``config.json``.

    Args:
      folder: A folder holding ``config.json``.

    Returns:
      ``vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim,
      rope_theta, rms_eps, tie_embeddings, rope_layout, max_seq_len``.

    Raises:
      ValueError: If the file is missing or describes an unsupported model.
    """
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise ValueError(f"No config.json in {folder}; it must be a Hugging Face model folder.")
    try:
        hf = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptModelFileError(
            f"{file}: not valid JSON ({e}); download the model's config.json again."
        ) from e
    if not isinstance(hf, dict):
        raise CorruptModelFileError(f"{file}: expected a JSON object; download it again.")
    try:
        return _config_from(hf, file)
    except KeyError as e:
        raise CorruptModelFileError(
            f"{file}: incomplete, the key {e.args[0]!r} is missing (a LLaMA config.json needs "
            "hidden_size, num_attention_heads, num_hidden_layers, intermediate_size and "
            "vocab_size); download the model's config.json again."
        ) from e
    except JaxquantError:
        raise
    except (TypeError, ValueError, AttributeError, ArithmeticError) as e:
        raise CorruptModelFileError(
            f"{file}: a value has the wrong type ({e}); download the model's config.json again."
        ) from e


def _config_from(hf: dict, file: Path) -> dict[str, Any]:
    model_type = hf.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise JaxquantError(
            f"{file}: model_type {model_type!r} is not supported; expected one of "
            f"{SUPPORTED_MODEL_TYPES}."
        )
    scaling = hf.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
        raise JaxquantError(
            f"{file}: rope_scaling {hf['rope_scaling']} is not supported; only plain RoPE "
            "(rope_scaling null) models can be loaded."
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise JaxquantError(f"{file}: attention_bias / mlp_bias models are not supported.")
    d_model = int(hf["hidden_size"])
    n_heads = int(hf["num_attention_heads"])
    return {
        "vocab_size": int(hf["vocab_size"]),
        "d_model": d_model,
        "n_layers": int(hf["num_hidden_layers"]),
        "n_heads": n_heads,
        "n_kv_heads": int(hf.get("num_key_value_heads") or n_heads),
        "head_dim": int(hf.get("head_dim") or d_model // n_heads),
        "ffn_dim": int(hf["intermediate_size"]),
        "rope_theta": float(hf.get("rope_theta", 10000.0)),
        "rms_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "rope_layout": "half",
        "max_seq_len": int(hf.get("max_position_embeddings", 2048)),
    }


def _canonical_name(name: str, root: Path) -> tuple[str, bool]:
    """HF tensor name -> (canonical name, whether to transpose)."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        if parts[3] in _LAYER_TENSORS:
            suffix, transpose = _LAYER_TENSORS[parts[3]]
            return f"layers.{int(parts[2])}.{suffix}", transpose
    raise ValueError(
        f"{root}: unexpected tensor {name!r}. Only plain LLaMA weights are supported "
        "(no biases, no quantized or adapter tensors)."
    )
